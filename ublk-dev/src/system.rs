//! Process-level set-up of the device daemon: its own mount namespace and
//! readiness notification to systemd.

use std::os::unix::net::UnixDatagram;

use crate::error::{Error, Result};

/// Move this process into a mount namespace of its own, with no mount
/// propagation from the host.
///
/// A file system mounted on `/dev/ublkbN` must never appear in the daemon's
/// own namespace: if it did, the daemon's exit would have to unmount it,
/// which needs I/O that only the exiting daemon could serve (libublk-rs
/// issue #50). Must be called before any thread is started.
pub fn private_mount_namespace() -> Result<()> {
    use nix::mount::{mount, MsFlags};
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS)
        .map_err(|e| Error::io("creating a private mount namespace", e.into()))?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(|e| Error::io("making mounts private", e.into()))
}

/// Tell systemd (when started by it with `Type=notify`) about our state,
/// e.g. `"READY=1\nSTATUS=serving /dev/ublkb0"`. Does nothing outside systemd.
pub fn sd_notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let sent = UnixDatagram::unbound().and_then(|sock| {
        let bytes = path.as_encoded_bytes();
        if let Some(name) = bytes.strip_prefix(b"@") {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
            sock.send_to_addr(state.as_bytes(), &addr)
        } else {
            sock.send_to(state.as_bytes(), &path)
        }
    });
    if let Err(e) = sent {
        tracing::warn!("cannot notify systemd: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notifies_a_listening_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let listener = UnixDatagram::bind(&path).unwrap();
        // The only test that touches NOTIFY_SOCKET.
        std::env::set_var("NOTIFY_SOCKET", &path);
        sd_notify("READY=1");
        std::env::remove_var("NOTIFY_SOCKET");
        let mut buf = [0u8; 64];
        let n = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");
    }
}
