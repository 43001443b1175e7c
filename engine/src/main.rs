//! The `pipe` binary: everything lives in the library; see `pipe_engine::cli`.
//!
//! Built with jemalloc: the engine makes many small allocations on several threads, which
//! jemalloc serves faster than the system allocator (a no-op build of 10,000 stages: about 0.9x
//! the time; bench/README.md). The spawn server, which forks once per stage, is the `pipe-spawn`
//! binary, built with the system allocator (see `pipe_engine::sandbox::zygote` for why).

#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> std::process::ExitCode {
    pipe_engine::cli::main()
}
