//! The socket filter: one small seccomp-BPF program, installed on the engine itself and (stricter)
//! on every processor, and the engine's side of seccomp user notifications.
//!
//! The program lets every system call through except:
//!
//! - `socket()` / `socketpair()` of any family but `AF_UNIX`: a *network access*. What happens then
//!   depends on who installed the filter ([`OnNetwork`]).
//! - the same with `AF_NETLINK` (kernel messaging, e.g. glibc's interface probe in `getaddrinfo`):
//!   fails with `EAFNOSUPPORT`; not a network access, so not a violation.
//! - `io_uring_setup()`: fails with `ENOSYS`, because io_uring operations would not pass through
//!   the `socket()` rule. Programs fall back to ordinary system calls.
//! - system calls of another ABI (32-bit x86, x32): fail with `ENOSYS`; the rule above could not
//!   see their socket calls.
//!
//! Filters stack and are inherited by every child. When several filters answer, the kernel takes
//! the most severe action: KILL > TRAP > ERRNO > USER_NOTIF > TRACE > ALLOW. That is why the
//! engine's own filter answers a network socket with `SECCOMP_RET_TRACE` (without a tracer the call
//! fails with `ENOSYS`; an engine bug cannot kill the build) rather than with an errno: an errno
//! would take precedence over the processor filter's notification and hide the violation from us.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// `AUDIT_ARCH_*` of the architecture this binary is built for.
#[cfg(target_arch = "x86_64")]
pub const AUDIT_ARCH: Option<u32> = Some(0xC000_003E);
#[cfg(target_arch = "aarch64")]
pub const AUDIT_ARCH: Option<u32> = Some(0xC000_00B7);
#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
pub const AUDIT_ARCH: Option<u32> = None;

/// System call numbers with this bit set are the x32 ABI on x86-64.
const X32_SYSCALL_BIT: u32 = 0x4000_0000;

/// What the filter does with a network `socket()` call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnNetwork {
    /// The engine's own filter: fail with `ENOSYS` (via `SECCOMP_RET_TRACE` without a tracer).
    Deny,
    /// Stop the caller and notify the supervisor holding the listener descriptor.
    Notify,
    /// Kill the calling process with `SIGSYS`.
    Kill,
}

impl OnNetwork {
    fn action(self) -> u32 {
        match self {
            OnNetwork::Deny => libc::SECCOMP_RET_TRACE,
            OnNetwork::Notify => libc::SECCOMP_RET_USER_NOTIF,
            OnNetwork::Kill => libc::SECCOMP_RET_KILL_PROCESS,
        }
    }
}

const LD_W_ABS: u16 = (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16;
const JEQ_K: u16 = (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16;
const JGE_K: u16 = (libc::BPF_JMP | libc::BPF_JGE | libc::BPF_K) as u16;
const RET_K: u16 = (libc::BPF_RET | libc::BPF_K) as u16;

/// Offsets into `struct seccomp_data`.
const OFFSET_NR: u32 = 0;
const OFFSET_ARCH: u32 = 4;
/// Low 32 bits of `args[0]` (little-endian targets only).
const OFFSET_ARG0: u32 = 16;

fn ins(code: u16, k: u32, jt: u8, jf: u8) -> libc::sock_filter {
    libc::sock_filter { code, jt, jf, k }
}

/// The filter program. `None` on an architecture this module does not know.
pub fn program(on_network: OnNetwork) -> Option<Vec<libc::sock_filter>> {
    let arch = AUDIT_ARCH?;
    let errno = |e: i32| libc::SECCOMP_RET_ERRNO | (e as u32 & libc::SECCOMP_RET_DATA);
    // Jump offsets are relative to the next instruction; the index of each line is on its left.
    Some(vec![
        /* 0 */ ins(LD_W_ABS, OFFSET_ARCH, 0, 0),
        /* 1 */ ins(JEQ_K, arch, 1, 0),
        /* 2 */ ins(RET_K, errno(libc::ENOSYS), 0, 0),
        /* 3 */ ins(LD_W_ABS, OFFSET_NR, 0, 0),
        /* 4 */ ins(JGE_K, X32_SYSCALL_BIT, 0, 1),
        /* 5 */ ins(RET_K, errno(libc::ENOSYS), 0, 0),
        /* 6 */ ins(JEQ_K, libc::SYS_socket as u32, 3, 0), // → 10
        /* 7 */ ins(JEQ_K, libc::SYS_socketpair as u32, 2, 0), // → 10
        /* 8 */ ins(JEQ_K, libc::SYS_io_uring_setup as u32, 5, 0), // → 14
        /* 9 */ ins(RET_K, libc::SECCOMP_RET_ALLOW, 0, 0),
        /* 10 */ ins(LD_W_ABS, OFFSET_ARG0, 0, 0),
        /* 11 */ ins(JEQ_K, libc::AF_UNIX as u32, 3, 0), // → 15
        /* 12 */ ins(JEQ_K, libc::AF_NETLINK as u32, 3, 0), // → 16
        /* 13 */ ins(RET_K, on_network.action(), 0, 0),
        /* 14 */ ins(RET_K, errno(libc::ENOSYS), 0, 0),
        /* 15 */ ins(RET_K, libc::SECCOMP_RET_ALLOW, 0, 0),
        /* 16 */ ins(RET_K, errno(libc::EAFNOSUPPORT), 0, 0),
    ])
}

/// Installs `program` on the calling thread (on every thread with `all_threads`). With `notify`,
/// returns the listener descriptor of the new filter (close-on-exec).
pub fn install(
    program: &[libc::sock_filter],
    all_threads: bool,
    notify: bool,
) -> io::Result<Option<OwnedFd>> {
    let mut flags: libc::c_ulong = 0;
    if all_threads {
        flags |= libc::SECCOMP_FILTER_FLAG_TSYNC;
    }
    if notify {
        flags |= libc::SECCOMP_FILTER_FLAG_NEW_LISTENER;
    }
    let prog = libc::sock_fprog {
        len: program.len() as u16,
        filter: program.as_ptr() as *mut libc::sock_filter,
    };
    let set = || {
        // SAFETY: `prog` points to `program`, which outlives the call; the kernel copies it.
        unsafe {
            libc::syscall(
                libc::SYS_seccomp,
                libc::SECCOMP_SET_MODE_FILTER,
                flags,
                &prog as *const libc::sock_fprog,
            )
        }
    };
    let mut r = set();
    if r < 0 && io::Error::last_os_error().raw_os_error() == Some(libc::EACCES) {
        // Without CAP_SYS_ADMIN a filter needs no_new_privs first.
        rustix::thread::set_no_new_privs(true)?;
        r = set();
    }
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    if all_threads && r > 0 {
        return Err(io::Error::other(format!(
            "thread {r} could not be synchronised to the filter"
        )));
    }
    if notify {
        // SAFETY: with NEW_LISTENER the kernel returned a fresh descriptor that nothing else owns.
        Ok(Some(unsafe { OwnedFd::from_raw_fd(r as i32) }))
    } else {
        Ok(None)
    }
}

/// The engine's own filter, on every thread of this process: network sockets fail with `ENOSYS`.
pub fn install_self_filter() -> io::Result<()> {
    let program = program(OnNetwork::Deny)
        .ok_or_else(|| io::Error::other("seccomp filter not available on this architecture"))?;
    install(&program, true, false).map(|_| ())
}

/// One network access a notification reported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notified {
    pub id: u64,
    pub pid: u32,
    pub syscall: &'static str,
    pub family: i32,
    pub sock_type: i32,
}

/// Receives one pending notification from listener `fd`. `Ok(None)` when the caller died before
/// it could be received.
pub fn receive(fd: &OwnedFd) -> io::Result<Option<Notified>> {
    let mut sizes = libc::seccomp_notif_sizes {
        seccomp_notif: 0,
        seccomp_notif_resp: 0,
        seccomp_data: 0,
    };
    // SAFETY: GET_NOTIF_SIZES writes one `seccomp_notif_sizes` into the pointer given.
    let r = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_GET_NOTIF_SIZES,
            0,
            &mut sizes as *mut libc::seccomp_notif_sizes,
        )
    };
    let kernel_size = if r == 0 {
        sizes.seccomp_notif as usize
    } else {
        0
    };
    let size = kernel_size.max(std::mem::size_of::<libc::seccomp_notif>());
    // A zeroed buffer at least as large as the kernel's struct, aligned for `seccomp_notif`.
    let mut buffer = vec![0u64; size.div_ceil(8)];
    // SAFETY: NOTIF_RECV writes at most `sizes.seccomp_notif` bytes into the buffer, which is
    // that large and zeroed as the kernel requires.
    let r = unsafe {
        libc::ioctl(
            fd.as_raw_fd(),
            libc::SECCOMP_IOCTL_NOTIF_RECV,
            buffer.as_mut_ptr(),
        )
    };
    if r < 0 {
        let err = io::Error::last_os_error();
        return match err.raw_os_error() {
            Some(libc::ENOENT) | Some(libc::EINTR) => Ok(None),
            _ => Err(err),
        };
    }
    // SAFETY: the buffer is 8-byte aligned, at least `size_of::<seccomp_notif>()` long and now
    // holds a notification written by the kernel.
    let notif: libc::seccomp_notif =
        unsafe { std::ptr::read(buffer.as_ptr() as *const libc::seccomp_notif) };
    let nr = notif.data.nr as libc::c_long;
    let syscall = if nr == libc::SYS_socket {
        "socket"
    } else if nr == libc::SYS_socketpair {
        "socketpair"
    } else {
        "syscall"
    };
    Ok(Some(Notified {
        id: notif.id,
        pid: notif.pid,
        syscall,
        family: notif.data.args[0] as i32,
        sock_type: notif.data.args[1] as i32,
    }))
}

/// Whether notification `id` is still pending (its caller alive and waiting).
pub fn still_pending(fd: &OwnedFd, id: u64) -> bool {
    let mut id = id;
    // SAFETY: NOTIF_ID_VALID reads one u64 from the pointer given.
    unsafe { libc::ioctl(fd.as_raw_fd(), libc::SECCOMP_IOCTL_NOTIF_ID_VALID, &mut id) == 0 }
}

/// Answers notification `id`: the system call fails with `errno`.
pub fn deny(fd: &OwnedFd, id: u64, errno: i32) {
    let mut resp = libc::seccomp_notif_resp {
        id,
        val: 0,
        error: -errno,
        flags: 0,
    };
    // SAFETY: NOTIF_SEND reads one `seccomp_notif_resp` from the pointer given. A failure means
    // the caller is gone, which is fine.
    unsafe {
        libc::ioctl(fd.as_raw_fd(), libc::SECCOMP_IOCTL_NOTIF_SEND, &mut resp);
    }
}

/// `AF_INET` and friends by name.
pub fn family_name(family: i32) -> String {
    match family {
        libc::AF_INET => "AF_INET".into(),
        libc::AF_INET6 => "AF_INET6".into(),
        libc::AF_PACKET => "AF_PACKET".into(),
        libc::AF_NETLINK => "AF_NETLINK".into(),
        libc::AF_UNIX => "AF_UNIX".into(),
        libc::AF_VSOCK => "AF_VSOCK".into(),
        libc::AF_BLUETOOTH => "AF_BLUETOOTH".into(),
        libc::AF_CAN => "AF_CAN".into(),
        libc::AF_TIPC => "AF_TIPC".into(),
        libc::AF_XDP => "AF_XDP".into(),
        libc::AF_ALG => "AF_ALG".into(),
        other => format!("family {other}"),
    }
}

/// `SOCK_STREAM` and friends by name (flags such as `SOCK_CLOEXEC` stripped).
pub fn type_name(sock_type: i32) -> String {
    match sock_type & 0xf {
        libc::SOCK_STREAM => "SOCK_STREAM".into(),
        libc::SOCK_DGRAM => "SOCK_DGRAM".into(),
        libc::SOCK_RAW => "SOCK_RAW".into(),
        libc::SOCK_SEQPACKET => "SOCK_SEQPACKET".into(),
        other => format!("type {other}"),
    }
}
