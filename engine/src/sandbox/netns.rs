//! A fresh network namespace: no interface but a loopback that is down, so no address (not even
//! 127.0.0.1) is reachable, whatever the protocol (TCP, UDP, raw, ...).
//!
//! As root (CAP_SYS_ADMIN) `unshare(CLONE_NEWNET)` is enough. Otherwise the process first enters a
//! new user namespace in which it keeps its own uid and gid (mapped to themselves), which gives it
//! the right to create the network namespace.

use std::io;

/// How the namespace was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entered {
    /// `CLONE_NEWNET` alone (privileged).
    Privileged,
    /// `CLONE_NEWUSER | CLONE_NEWNET`, uid and gid mapped to themselves.
    WithUserNamespace,
}

/// Moves the calling (single-threaded) process into a new network namespace.
pub fn enter() -> io::Result<Entered> {
    use rustix::thread::UnshareFlags;
    let unshare = |flags: UnshareFlags| {
        // SAFETY: the flags never include CLONE_FILES, the only one that can invalidate file
        // descriptors other threads hold; namespaces are per-process state the caller asked for.
        unsafe { rustix::thread::unshare_unsafe(flags) }
    };
    match unshare(UnshareFlags::NEWNET) {
        Ok(()) => return Ok(Entered::Privileged),
        Err(err) if err == rustix::io::Errno::PERM => {}
        Err(err) => return Err(err.into()),
    }
    let uid = rustix::process::getuid().as_raw();
    let gid = rustix::process::getgid().as_raw();
    unshare(UnshareFlags::NEWUSER | UnshareFlags::NEWNET).map_err(|err| {
        io::Error::new(
            io::Error::from(err).kind(),
            format!(
                "unshare(CLONE_NEWUSER | CLONE_NEWNET): {err} (user namespaces may be disabled)"
            ),
        )
    })?;
    std::fs::write("/proc/self/setgroups", "deny")?;
    std::fs::write("/proc/self/uid_map", format!("{uid} {uid} 1"))?;
    std::fs::write("/proc/self/gid_map", format!("{gid} {gid} 1"))?;
    Ok(Entered::WithUserNamespace)
}

/// Moves the calling (single-threaded) process into a new network namespace if it may do so
/// without a user namespace (as root); `false` otherwise, and nothing changed.
pub fn enter_privileged() -> bool {
    // SAFETY: as in `enter`: CLONE_NEWNET only, no CLONE_FILES.
    unsafe { rustix::thread::unshare_unsafe(rustix::thread::UnshareFlags::NEWNET) }.is_ok()
}
