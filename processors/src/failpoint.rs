//! Named crash points at every durability step, for the crash-consistency test sweep.
//!
//! `PIPE_FAILPOINT=NAME:K` makes the process kill itself with SIGKILL the K-th time execution
//! reaches `hit("NAME")` (counted per process). SIGKILL, not a panic: unwinding would run
//! destructors that flush buffers and hide exactly the bugs the sweep looks for. When
//! `PIPE_FAILPOINT_FIRED` names a file, `NAME:K` is appended to it first, so a test knows which
//! point fired. Unset, a hit costs one atomic load.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

struct Armed {
    name: String,
    at: u64,
    hits: AtomicU64,
}

fn armed() -> Option<&'static Armed> {
    static ARMED: OnceLock<Option<Armed>> = OnceLock::new();
    ARMED
        .get_or_init(|| {
            let spec = std::env::var("PIPE_FAILPOINT").ok()?;
            let (name, at) = spec.rsplit_once(':')?;
            Some(Armed {
                name: name.to_string(),
                at: at.parse().ok()?,
                hits: AtomicU64::new(0),
            })
        })
        .as_ref()
}

/// Marks durability step `name`; kills the process here if the environment armed it.
pub fn hit(name: &str) {
    let Some(armed) = armed() else { return };
    if armed.name != name {
        return;
    }
    let count = armed.hits.fetch_add(1, Ordering::SeqCst) + 1;
    if count != armed.at {
        return;
    }
    if let Some(path) = std::env::var_os("PIPE_FAILPOINT_FIRED") {
        if let Ok(mut file) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            let _ = writeln!(file, "{name}:{count}");
        }
    }
    crash_now()
}

/// Dies the way a power cut or the OOM killer would: no unwinding, no buffers flushed.
pub fn crash_now() -> ! {
    let _ = rustix::process::kill_process(rustix::process::getpid(), rustix::process::Signal::KILL);
    std::process::abort()
}
