//! Link change notifications. A NETLINK_ROUTE socket subscribed to the link group tells the
//! agent the moment an interface appears, changes or goes, so it describes and attaches to a new
//! pod's veth within milliseconds instead of at the next one-second rescan. The messages
//! themselves are not parsed: any of them means "rescan", and the rescan reads the interfaces
//! afresh.

use std::{
    io,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
};

use tokio::io::{unix::AsyncFd, Interest};

/// Subscribed to RTMGRP_LINK in the network namespace of the thread that opened it.
pub struct LinkEvents {
    socket: AsyncFd<OwnedFd>,
}

impl LinkEvents {
    pub fn open() -> io::Result<Self> {
        // SAFETY: plain socket(2); the result is checked and owned below.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                libc::NETLINK_ROUTE,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a descriptor we just created and nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: a zeroed sockaddr_nl is valid; the fields we need are set below.
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        addr.nl_groups = libc::RTMGRP_LINK as u32;
        // SAFETY: `addr` is a valid sockaddr_nl of the size given.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                &addr as *const libc::sockaddr_nl as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the OwnedFd moves into the AsyncFd, which keeps it open and unchanged until
        // the AsyncFd is dropped.
        let socket = unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }
            .map_err(io::Error::from)?;
        Ok(Self { socket })
    }

    /// Waits until some link changed, then empties the socket's queue so a burst of messages
    /// (creating a veth pair sends several) is one change.
    pub async fn changed(&mut self) -> io::Result<()> {
        let mut buf = [0u8; 8192];
        loop {
            let mut guard = self.socket.readable().await?;
            let mut got = false;
            loop {
                // SAFETY: recv into a buffer we own, of the length given.
                let n = unsafe {
                    libc::recv(
                        guard.get_inner().as_raw_fd(),
                        buf.as_mut_ptr().cast(),
                        buf.len(),
                        0,
                    )
                };
                if n >= 0 {
                    got = true;
                    continue;
                }
                let err = io::Error::last_os_error();
                match err.raw_os_error() {
                    Some(libc::EAGAIN) => break,
                    // The kernel dropped messages because we were slow: something changed.
                    Some(libc::ENOBUFS) => got = true,
                    Some(libc::EINTR) => continue,
                    _ => return Err(err),
                }
            }
            guard.clear_ready();
            if got {
                return Ok(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// Root only (like every test `cargo xtask test` runs): a namespace of its own, a veth
    /// created in it, and the notification that follows.
    #[test]
    fn a_new_interface_is_noticed() {
        // SAFETY: geteuid cannot fail.
        assert_eq!(unsafe { libc::geteuid() }, 0, "needs root (namespaces)");
        let ns = tollgate_testbed::NetNs::new(&format!("tglw{}", std::process::id() % 100_000))
            .expect("namespace");
        let noticed = ns
            .run(|| {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(async {
                    let mut events = LinkEvents::open().expect("netlink socket");
                    // Runs in this thread's namespace: a child inherits it.
                    let status = std::process::Command::new("ip")
                        .args(["link", "add", "lw0", "type", "veth", "peer", "name", "lw1"])
                        .status()
                        .expect("ip");
                    assert!(status.success());
                    tokio::time::timeout(Duration::from_secs(2), events.changed())
                        .await
                        .is_ok_and(|r| r.is_ok())
                })
            })
            .expect("run in namespace");
        assert!(noticed, "no link notification within 2 s");
    }
}
