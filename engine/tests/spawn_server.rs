//! The real spawn server: every child it forks is answered with its pid on the control channel,
//! and its end reaches the spawn's callback exactly once through the ends channel. (Which of the
//! two a fast child's end beats is the unit test's job, in `sandbox::zygote`, where the order can
//! be forced.)

use std::path::Path;
use std::sync::mpsc;
use std::time::Duration;

use pipe_engine::sandbox::channel;
use pipe_engine::sandbox::zygote::{self, Exit};

#[test]
fn every_child_of_the_server_gets_its_pid_and_its_end_once() {
    let exe = Path::new(env!("CARGO_BIN_EXE_pipe"));
    let server = zygote::shared(exe).expect("the spawn server starts");
    let dir = tempfile::tempdir().unwrap();
    let log = std::fs::File::create(dir.path().join("log")).unwrap();
    let (tx, rx) = mpsc::channel::<Option<Exit>>();
    let mut pids = Vec::new();
    for _ in 0..64 {
        // A helper with an argument it does not know exits 2 at once.
        let (_engine_end, helper_end) = channel::pair().unwrap();
        let tx = tx.clone();
        let pid = server
            .spawn(
                &["--no-such-flag".into()],
                &[],
                dir.path(),
                &helper_end,
                &log,
                Box::new(move |exit| tx.send(exit).unwrap()),
            )
            .expect("the server forks the helper");
        pids.push(pid);
    }
    drop(tx);
    let mut told = 0;
    while let Ok(exit) = rx.recv_timeout(Duration::from_secs(30)) {
        let exit = exit.expect("the server told the end");
        assert!(
            libc::WIFEXITED(exit.status) && libc::WEXITSTATUS(exit.status) == 2,
            "status {:#x}",
            exit.status
        );
        told += 1;
    }
    // Each callback is called at most once (`FnOnce`); every one of them was.
    assert_eq!(told, pids.len());
    pids.sort_unstable();
    pids.dedup();
    assert_eq!(pids.len(), 64, "64 children");
    let usage = std::fs::read_to_string(dir.path().join("log")).unwrap();
    assert!(
        usage.contains("unexpected argument `--no-such-flag`"),
        "{usage}"
    );
}
