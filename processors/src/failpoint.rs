//! Named crash points at every durability step, for the crash-consistency test sweep.
//!
//! `PIPE_FAILPOINT=NAME:K` makes the process kill itself with SIGKILL the K-th time execution
//! reaches `hit("NAME")` (counted per process). SIGKILL, not a panic: unwinding would run
//! destructors that flush buffers and hide exactly the bugs the sweep looks for. When
//! `PIPE_FAILPOINT_FIRED` names a file, `NAME:K` is appended to it first, so a test knows which
//! point fired. Unset, a hit costs one atomic load.
//!
//! `PIPE_FAILPOINT=NAME:K:ebusy` instead makes the K-th [`check`] of `NAME` fail with `EBUSY`:
//! the transient local error a retry must absorb (a busy file, a lock held for a moment).

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

/// What an armed failpoint does when it fires.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    Kill,
    Busy,
}

struct Armed {
    name: String,
    at: u64,
    action: Action,
    hits: AtomicU64,
}

/// Parses `NAME:K` or `NAME:K:ebusy`.
fn parse(spec: &str) -> Option<(String, u64, Action)> {
    let (rest, last) = spec.rsplit_once(':')?;
    if last == "ebusy" {
        let (name, at) = rest.rsplit_once(':')?;
        return Some((name.to_string(), at.parse().ok()?, Action::Busy));
    }
    Some((rest.to_string(), last.parse().ok()?, Action::Kill))
}

fn armed() -> Option<&'static Armed> {
    static ARMED: OnceLock<Option<Armed>> = OnceLock::new();
    ARMED
        .get_or_init(|| {
            let (name, at, action) = parse(&std::env::var("PIPE_FAILPOINT").ok()?)?;
            Some(Armed {
                name,
                at,
                action,
                hits: AtomicU64::new(0),
            })
        })
        .as_ref()
}

/// The armed action if this visit of `name` fires it.
fn fires(name: &str) -> Option<Action> {
    let armed = armed()?;
    if armed.name != name {
        return None;
    }
    let count = armed.hits.fetch_add(1, Ordering::SeqCst) + 1;
    if count != armed.at {
        return None;
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
    Some(armed.action)
}

/// Marks durability step `name`; kills the process here if the environment armed it.
pub fn hit(name: &str) {
    if fires(name) == Some(Action::Kill) {
        crash_now()
    }
}

/// Like [`hit`], for a step that can report an error: an `ebusy` failpoint returns `EBUSY` here.
pub fn check(name: &str) -> std::io::Result<()> {
    match fires(name) {
        Some(Action::Kill) => crash_now(),
        Some(Action::Busy) => Err(std::io::Error::from_raw_os_error(libc::EBUSY)),
        None => Ok(()),
    }
}

/// Dies the way a power cut or the OOM killer would: no unwinding, no buffers flushed.
pub fn crash_now() -> ! {
    let _ = rustix::process::kill_process(rustix::process::getpid(), rustix::process::Signal::KILL);
    std::process::abort()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_with_an_optional_action() {
        assert_eq!(
            parse("publish.after-marker:3"),
            Some(("publish.after-marker".into(), 3, Action::Kill))
        );
        assert_eq!(
            parse("publish.after-output-rename:1:ebusy"),
            Some(("publish.after-output-rename".into(), 1, Action::Busy))
        );
        assert_eq!(parse("x:y"), None);
        assert_eq!(parse("nocolon"), None);
    }
}
