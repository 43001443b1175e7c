//! Each runtime layer of the offline sandbox, alone, in a forked child of this test, against a
//! listener this test starts on 127.0.0.1 (never any other address): the attempt must fail the
//! way the layer promises, and the listener must receive nothing.
//!
//! The children only make system calls and leave with `_exit`; they report through their exit
//! status (codes below), never by printing.

#![cfg(target_os = "linux")]

use std::io::ErrorKind;
// Test-only: loopback listeners this test starts itself. allow-net-mention
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket}; // allow-net-mention
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::time::Duration;

use pipe_engine::sandbox::{channel, filesystem, netns, seccomp, FsRules};

/// How a forked child ended.
#[derive(Debug, PartialEq, Eq)]
enum End {
    Exited(i32),
    Signaled(i32),
}

/// Runs `body` in a forked child; its return value is the exit code.
fn in_child(body: impl FnOnce() -> i32) -> End {
    // SAFETY: the child runs `body` (system calls and glibc functions, which are fork-safe) and
    // leaves with _exit, never returning into the test harness.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed");
    if pid == 0 {
        // SAFETY: alarm only arms a timer, so a stuck child cannot hang the suite.
        unsafe { libc::alarm(20) };
        let code = body();
        // SAFETY: ends the child without running the harness's destructors.
        unsafe { libc::_exit(code) };
    }
    let mut status = 0;
    // SAFETY: waits for our own child; writes one int.
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    if libc::WIFEXITED(status) {
        End::Exited(libc::WEXITSTATUS(status))
    } else {
        End::Signaled(libc::WTERMSIG(status))
    }
}

/// The errno of the last failed call.
fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// A loopback listener of this test; `received()` counts what reached it.
struct Listener {
    tcp: TcpListener, // allow-net-mention: loopback listener this test starts
    udp: UdpSocket,   // allow-net-mention: loopback listener this test starts
}

impl Listener {
    fn start() -> Listener {
        let tcp = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap(); // allow-net-mention: loopback listener this test starts
        tcp.set_nonblocking(true).unwrap();
        let udp = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap(); // allow-net-mention: loopback listener this test starts
        udp.set_nonblocking(true).unwrap();
        Listener { tcp, udp }
    }

    fn tcp_addr(&self) -> SocketAddr {
        self.tcp.local_addr().unwrap()
    }

    fn udp_addr(&self) -> SocketAddr {
        self.udp.local_addr().unwrap()
    }

    /// Connections and datagrams received. Called after the child ended: a connect to loopback
    /// completes its handshake inside connect(), so anything that got through is queued now.
    fn received(&self) -> usize {
        let mut n = 0;
        while self.tcp.accept().is_ok() {
            n += 1;
        }
        let mut buf = [0u8; 16];
        while self.udp.recv(&mut buf).is_ok() {
            n += 1;
        }
        n
    }
}

/// Exit codes of the children.
const REACHED: i32 = 0;
const BLOCKED_AS_EXPECTED: i32 = 10;
const WRONG_ERROR: i32 = 11;
const SETUP_FAILED: i32 = 12;

/// Tries TCP then UDP to the listener; `expect` is the errno each attempt must fail with.
fn try_both(tcp: SocketAddr, udp: SocketAddr, expect: i32) -> i32 {
    let connected = TcpStream::connect_timeout(&tcp, Duration::from_secs(5)); // allow-net-mention
    match connected {
        // allow-net-mention: loopback listener this test starts
        Ok(_) => return REACHED,
        Err(e) if e.raw_os_error() != Some(expect) => return WRONG_ERROR,
        Err(_) => {}
    }
    let bound = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)); // allow-net-mention
    let Ok(sock) = bound else {
        // allow-net-mention: loopback listener this test starts
        // In a namespace whose loopback is down even the bind fails: also blocked.
        return BLOCKED_AS_EXPECTED;
    };
    match sock.send_to(b"x", udp) {
        Ok(_) => REACHED,
        Err(e) if e.raw_os_error() == Some(expect) => BLOCKED_AS_EXPECTED,
        Err(_) => WRONG_ERROR,
    }
}

#[test]
fn a_fresh_network_namespace_reaches_no_address_over_tcp_or_udp() {
    let listener = Listener::start();
    let (tcp, udp) = (listener.tcp_addr(), listener.udp_addr());
    let end = in_child(|| {
        if netns::enter().is_err() {
            return SETUP_FAILED;
        }
        try_both(tcp, udp, libc::ENETUNREACH)
    });
    assert_eq!(end, End::Exited(BLOCKED_AS_EXPECTED));
    assert_eq!(listener.received(), 0);
    // The same attempt without the layer does reach it: the test can fail.
    let control = in_child(|| try_both(tcp, udp, libc::ENETUNREACH));
    assert_eq!(control, End::Exited(REACHED));
    assert_eq!(listener.received(), 1, "the control's TCP connection");
}

#[test]
fn the_processor_filter_kills_at_the_first_network_socket_and_spares_unix_sockets() {
    let listener = Listener::start();
    let tcp = listener.tcp_addr();
    let end = in_child(|| {
        let program = seccomp::program(seccomp::OnNetwork::Kill).unwrap();
        if rustix::thread::set_no_new_privs(true).is_err()
            || seccomp::install(&program, false, false).is_err()
        {
            return SETUP_FAILED;
        }
        // AF_UNIX works, netlink and io_uring fail softly.
        if channel::pair().is_err() {
            return 20;
        }
        // SAFETY: plain integers.
        if unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_RAW, 0) } >= 0
            || errno() != libc::EAFNOSUPPORT
        {
            return 21;
        }
        // SAFETY: io_uring_setup with a null params pointer; it is denied before it looks.
        if unsafe { libc::syscall(libc::SYS_io_uring_setup, 1, std::ptr::null::<u8>()) } >= 0
            || errno() != libc::ENOSYS
        {
            return 22;
        }
        let connected = TcpStream::connect(tcp); // allow-net-mention
        match connected {
            // allow-net-mention: loopback listener this test starts
            Ok(_) => REACHED,
            Err(_) => WRONG_ERROR, // not killed
        }
    });
    assert_eq!(end, End::Signaled(libc::SIGSYS));
    assert_eq!(listener.received(), 0);
}

#[test]
fn the_engine_filter_fails_network_sockets_with_enosys_without_killing() {
    let listener = Listener::start();
    let (tcp, udp) = (listener.tcp_addr(), listener.udp_addr());
    let end = in_child(|| {
        if seccomp::install_self_filter().is_err() {
            return SETUP_FAILED;
        }
        if channel::pair().is_err() {
            return 20;
        }
        // The UDP bind fails too (no socket), which try_both counts as blocked.
        try_both(tcp, udp, libc::ENOSYS)
    });
    assert_eq!(end, End::Exited(BLOCKED_AS_EXPECTED));
    assert_eq!(listener.received(), 0);
}

/// The engine's filter is inherited by every processor, and filters stack with the most severe
/// answer winning: its answer must never hide the processor filter's notification.
#[test]
fn a_notification_reaches_the_supervisor_even_under_the_engine_filter() {
    let listener = Listener::start();
    let tcp = listener.tcp_addr();
    let (parent_end, child_end) = channel::pair().unwrap();
    let pid = {
        // SAFETY: as in `in_child`; the child only makes system calls and leaves with _exit.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            // SAFETY: see above.
            unsafe { libc::alarm(20) };
            let code = (|| {
                seccomp::install_self_filter().map_err(|_| SETUP_FAILED)?;
                let program = seccomp::program(seccomp::OnNetwork::Notify).unwrap();
                rustix::thread::set_no_new_privs(true).map_err(|_| SETUP_FAILED)?;
                let listener_fd = seccomp::install(&program, false, true)
                    .map_err(|_| SETUP_FAILED)?
                    .ok_or(SETUP_FAILED)?;
                channel::send(child_end.as_fd(), b"fd", Some(listener_fd.as_fd()))
                    .map_err(|_| SETUP_FAILED)?;
                drop(listener_fd);
                // Blocks until the supervisor answers.
                let connected = TcpStream::connect(tcp); // allow-net-mention
                match connected {
                    // allow-net-mention: loopback listener this test starts
                    Ok(_) => Err(REACHED),
                    Err(e) if e.raw_os_error() == Some(libc::EPERM) => Ok(()),
                    Err(_) => Err(WRONG_ERROR),
                }
            })();
            // SAFETY: see above.
            unsafe { libc::_exit(code.map_or_else(|c| c, |()| BLOCKED_AS_EXPECTED)) };
        }
        pid
    };
    drop(child_end);
    let mut buf = [0u8; 16];
    let (_, fd) = channel::recv(parent_end.as_fd(), &mut buf)
        .unwrap()
        .expect("the child sent its listener");
    let fd = fd.expect("with the descriptor");
    // Wait (bounded) for the notification: a filter that answered first would leave none.
    let mut fds = [rustix::event::PollFd::new(
        &fd,
        rustix::event::PollFlags::IN,
    )];
    let ten_seconds = rustix::event::Timespec {
        tv_sec: 10,
        tv_nsec: 0,
    };
    rustix::event::poll(&mut fds, Some(&ten_seconds)).unwrap();
    assert!(
        fds[0].revents().contains(rustix::event::PollFlags::IN),
        "no notification: another filter answered the network socket first"
    );
    let notified = seccomp::receive(&fd)
        .unwrap()
        .expect("a pending notification");
    assert_eq!(notified.pid as i32, pid);
    assert_eq!(notified.syscall, "socket");
    assert_eq!(notified.family, libc::AF_INET);
    assert!(seccomp::still_pending(&fd, notified.id));
    seccomp::deny(&fd, notified.id, libc::EPERM);
    let mut status = 0;
    // SAFETY: waits for our own child.
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    assert!(libc::WIFEXITED(status));
    assert_eq!(libc::WEXITSTATUS(status), BLOCKED_AS_EXPECTED);
    assert_eq!(listener.received(), 0);
}

fn temp_dirs() -> (tempfile::TempDir, PathBuf, PathBuf) {
    let base = tempfile::tempdir().unwrap();
    let inside = base.path().join("staging");
    let outside = base.path().join("elsewhere");
    std::fs::create_dir_all(&inside).unwrap();
    std::fs::create_dir_all(&outside).unwrap();
    (base, inside, outside)
}

#[test]
fn landlock_denies_tcp_and_every_write_outside_the_allowed_folders() {
    let listener = Listener::start();
    let tcp = listener.tcp_addr();
    let (_base, inside, outside) = temp_dirs();
    let (inside_c, outside_c) = (inside.clone(), outside.clone());
    let end = in_child(move || {
        let rules = FsRules {
            write: vec![inside_c.clone()],
            deny_tcp: true,
            ..FsRules::default()
        };
        match filesystem::restrict(&rules) {
            Ok(applied) if applied.tcp => {}
            _ => return SETUP_FAILED,
        }
        if std::fs::write(inside_c.join("ok.txt"), "x").is_err() {
            return 30;
        }
        match std::fs::write(outside_c.join("escape.txt"), "x") {
            Err(e) if e.kind() == ErrorKind::PermissionDenied => {}
            _ => return 31,
        }
        if std::fs::create_dir(outside_c.join("dir")).is_ok() {
            return 32;
        }
        // Reads are not restricted outside hermetic mode.
        if std::fs::read_to_string("/proc/self/status").is_err() {
            return 33;
        }
        let connected = TcpStream::connect_timeout(&tcp, Duration::from_secs(5)); // allow-net-mention
        match connected {
            // allow-net-mention: loopback listener this test starts
            Ok(_) => REACHED,
            Err(e) if e.raw_os_error() == Some(libc::EACCES) => BLOCKED_AS_EXPECTED,
            Err(_) => WRONG_ERROR,
        }
    });
    assert_eq!(end, End::Exited(BLOCKED_AS_EXPECTED));
    assert!(inside.join("ok.txt").exists());
    assert!(!outside.join("escape.txt").exists());
    assert!(!outside.join("dir").exists());
    assert_eq!(listener.received(), 0);
}

#[test]
fn hermetic_landlock_reads_only_what_is_allowed() {
    let (_base, inside, outside) = temp_dirs();
    let declared = outside.join("declared.txt");
    let undeclared = outside.join("undeclared.txt");
    std::fs::write(&declared, "yes").unwrap();
    std::fs::write(&undeclared, "no").unwrap();
    let end = in_child(move || {
        let rules = FsRules {
            write: vec![inside.clone()],
            read: Some(vec![declared.clone()]),
            list: vec![outside.clone()],
            deny_tcp: true,
        };
        if filesystem::restrict(&rules).is_err() {
            return SETUP_FAILED;
        }
        if std::fs::read_to_string(&declared).ok().as_deref() != Some("yes") {
            return 40;
        }
        match std::fs::read(&undeclared) {
            Err(e) if e.kind() == ErrorKind::PermissionDenied => {}
            _ => return 41,
        }
        // Listing a `list` folder works; reading /etc does not (not in the read rules here).
        if std::fs::read_dir(&outside).is_err() {
            return 42;
        }
        if std::fs::read("/etc/passwd").is_ok() {
            return 43;
        }
        BLOCKED_AS_EXPECTED
    });
    assert_eq!(end, End::Exited(BLOCKED_AS_EXPECTED));
}
