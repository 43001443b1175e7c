//! The report channel between the engine and the re-exec helper: an `AF_UNIX` `SOCK_SEQPACKET`
//! socket pair (message boundaries kept), which can also carry a file descriptor (`SCM_RIGHTS`):
//! the helper hands the engine the listener of its seccomp filter this way.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

/// Longest message either side sends.
pub const MAX_MESSAGE: usize = 64 * 1024;

/// A connected pair, both ends close-on-exec.
pub fn pair() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: socketpair writes two descriptors into the array, which has room for them.
    let r = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both descriptors were just created and are owned by nothing else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// A connected `AF_UNIX` `SOCK_STREAM` pair, both ends close-on-exec: the engine's line channel to
/// the Slurm submitter ([`crate::slurm::submitter`]).
pub fn stream_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: socketpair writes two descriptors into the array, which has room for them.
    let r = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both descriptors were just created and are owned by nothing else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Whether `fd` is an open socket (the helper's check that the engine gave it a channel).
pub fn is_socket(fd: i32) -> bool {
    // SAFETY: an all-zero stat is a valid value of this plain C struct.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat writes one stat into the pointer given; a bad fd only makes it fail.
    let r = unsafe { libc::fstat(fd, &mut st) };
    r == 0 && (st.st_mode & libc::S_IFMT) == libc::S_IFSOCK
}

/// Sends one message, with `fd` attached when given.
pub fn send(sock: BorrowedFd<'_>, bytes: &[u8], fd: Option<BorrowedFd<'_>>) -> io::Result<()> {
    let mut iov = libc::iovec {
        iov_base: bytes.as_ptr() as *mut libc::c_void,
        iov_len: bytes.len(),
    };
    // Room for one control message carrying one descriptor, 8-byte aligned.
    let mut control = [0u64; 8];
    // SAFETY: an all-zero msghdr is a valid value of this plain C struct.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if let Some(fd) = fd {
        // SAFETY: CMSG_SPACE is a pure size computation.
        let space = unsafe { libc::CMSG_SPACE(std::mem::size_of::<libc::c_int>() as u32) } as usize;
        msg.msg_control = control.as_mut_ptr() as *mut libc::c_void;
        msg.msg_controllen = space;
        // SAFETY: msg_control points to `control`, which is larger than `space`, so the first
        // header and its data lie inside it; CMSG_FIRSTHDR/CMSG_DATA only compute addresses in it.
        unsafe {
            let header = libc::CMSG_FIRSTHDR(&msg);
            (*header).cmsg_level = libc::SOL_SOCKET;
            (*header).cmsg_type = libc::SCM_RIGHTS;
            (*header).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<libc::c_int>() as u32) as usize;
            std::ptr::write_unaligned(libc::CMSG_DATA(header) as *mut libc::c_int, fd.as_raw_fd());
        }
    }
    loop {
        // SAFETY: msg points to the iovec and control buffer above, which outlive the call.
        let r = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
        if r >= 0 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// Receives one message into `buf`: its length and the descriptor it carried (close-on-exec).
/// `Ok(None)` at end of stream (the helper exec'd or exited).
pub fn recv(sock: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<Option<(usize, Option<OwnedFd>)>> {
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr() as *mut libc::c_void,
        iov_len: buf.len(),
    };
    let mut control = [0u64; 8];
    // SAFETY: an all-zero msghdr is a valid value of this plain C struct.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr() as *mut libc::c_void;
    msg.msg_controllen = std::mem::size_of_val(&control);
    let n = loop {
        // SAFETY: msg points to `buf` and `control`, which outlive the call and are as large as
        // the lengths given.
        let r = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if r >= 0 {
            break r as usize;
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    };
    let mut received = None;
    // SAFETY: the kernel filled `control` (msg_controllen says how much); the CMSG macros walk
    // headers inside it, and SCM_RIGHTS data is an array of descriptors now owned by us.
    unsafe {
        let mut header = libc::CMSG_FIRSTHDR(&msg);
        while !header.is_null() {
            if (*header).cmsg_level == libc::SOL_SOCKET && (*header).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(header) as *const libc::c_int;
                let count = ((*header).cmsg_len - libc::CMSG_LEN(0) as usize)
                    / std::mem::size_of::<libc::c_int>();
                for i in 0..count {
                    let fd = OwnedFd::from_raw_fd(std::ptr::read_unaligned(data.add(i)));
                    if received.is_none() {
                        received = Some(fd);
                    }
                }
            }
            header = libc::CMSG_NXTHDR(&msg, header);
        }
    }
    if n == 0 && received.is_none() {
        return Ok(None);
    }
    Ok(Some((n, received)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::fd::AsFd;

    #[test]
    fn a_message_carries_bytes_and_a_descriptor() {
        let (a, b) = pair().unwrap();
        let (reader, writer) = rustix::pipe::pipe().unwrap();
        send(a.as_fd(), b"hello", Some(writer.as_fd())).unwrap();
        drop(writer);
        let mut buf = [0u8; 64];
        let (n, fd) = recv(b.as_fd(), &mut buf).unwrap().unwrap();
        assert_eq!(&buf[..n], b"hello");
        let mut passed = std::fs::File::from(fd.expect("a descriptor was passed"));
        passed.write_all(b"through").unwrap();
        drop(passed);
        let mut text = String::new();
        std::fs::File::from(reader)
            .read_to_string(&mut text)
            .unwrap();
        assert_eq!(text, "through");
        send(a.as_fd(), b"plain", None).unwrap();
        let (n, fd) = recv(b.as_fd(), &mut buf).unwrap().unwrap();
        assert_eq!((&buf[..n], fd.is_none()), (&b"plain"[..], true));
        drop(a);
        assert!(
            recv(b.as_fd(), &mut buf).unwrap().is_none(),
            "end of stream"
        );
        assert!(is_socket(b.as_raw_fd()));
    }
}
