//! The `pipe` binary: everything lives in the library; see `pipe_engine::cli`.

fn main() -> std::process::ExitCode {
    pipe_engine::cli::main()
}
