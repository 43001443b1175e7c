//! The `pipe-spawn` binary: the spawn server `pipe build` starts when it finds this binary beside
//! itself (see `pipe_engine::sandbox::zygote`). It is `pipe __zygote` built with the system
//! allocator, which makes a fork of it cheaper than a fork of the jemalloc-built `pipe`.

fn main() -> std::process::ExitCode {
    std::process::ExitCode::from(pipe_engine::sandbox::spawn_server_main())
}
