//! Connection plumbing shared by the daemons and the CLI: who we are (uid), the socket
//! directories we accept, gRPC over a Unix socket, and server connections that carry what the
//! kernel or the TLS handshake told us about the peer to the tonic handlers.

/// `AsyncWrite` for a server-side connection wrapper that only looks at what is read: every
/// write goes to its `inner` connection unchanged. The wrapper's other type parameters must
/// be `Unpin`.
macro_rules! forward_async_write {
    ($wrapper:ty, $inner:ident $(, $param:ident)*) => {
        impl<$inner: tokio::io::AsyncWrite + Unpin $(, $param: Unpin)*> tokio::io::AsyncWrite
            for $wrapper
        {
            fn poll_write(
                mut self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
                buf: &[u8],
            ) -> std::task::Poll<std::io::Result<usize>> {
                std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
            }

            fn poll_flush(
                mut self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                std::pin::Pin::new(&mut self.inner).poll_flush(cx)
            }

            fn poll_shutdown(
                mut self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
            }

            fn poll_write_vectored(
                mut self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
                bufs: &[std::io::IoSlice<'_>],
            ) -> std::task::Poll<std::io::Result<usize>> {
                std::pin::Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
            }

            fn is_write_vectored(&self) -> bool {
                self.inner.is_write_vectored()
            }
        }
    };
}
pub(crate) use forward_async_write;

pub mod authority;

use std::io;
use std::path::Path;
use std::pin::Pin;
use std::task::{Context, Poll};

use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, ReadBuf};

/// This process's uid: the owner of /proc/self (no libc call needed).
pub fn own_uid() -> u32 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self")
        .map(|m| m.uid())
        .unwrap_or(0)
}

/// Refuses to put a socket into an existing directory that another user controls: whoever
/// owns (or may write to) the directory could swap the socket for their own. A directory
/// owned by us or root, not writable by others (or sticky, like /tmp), is fine.
pub fn check_socket_dir(dir: &Path) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    let meta = match std::fs::metadata(dir) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e.to_string()),
    };
    let own = own_uid();
    if meta.uid() != own && meta.uid() != 0 {
        return Err(format!(
            "{} is owned by uid {}, not by this user or root",
            dir.display(),
            meta.uid()
        ));
    }
    let mode = meta.mode();
    let sticky = mode & 0o1000 != 0;
    if mode & 0o022 != 0 && !sticky {
        return Err(format!(
            "{} is writable by other users (mode {:o})",
            dir.display(),
            mode & 0o7777
        ));
    }
    Ok(())
}

/// Clears the way for binding a Unix socket at `path`: a socket file left behind by a process
/// that is gone is removed, but one that still answers belongs to a live server (another
/// `agentd server run` or `node run` with the same socket), and taking it over would leave
/// that server running unreachable: refused with `AddrInUse`.
pub fn clear_socket_path(path: &Path) -> io::Result<()> {
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => {
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                "another process is serving on this socket (stop it, or choose another path)",
            ))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        // Refused (a stale socket file) or not a socket: replaced, as before.
        Err(_) => {}
    }
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Connecting to a gRPC server on a Unix socket failed.
#[derive(Debug, thiserror::Error)]
#[error("cannot connect to {path}: {reason}")]
pub struct UnixConnectError {
    pub path: String,
    pub reason: String,
}

/// A gRPC channel over a Unix socket (the admin socket, the Workload API socket).
pub async fn unix_channel(path: &Path) -> Result<tonic::transport::Channel, UnixConnectError> {
    let shown = path.display().to_string();
    let fail = |reason: String| UnixConnectError {
        path: shown.clone(),
        reason,
    };
    let path = path.to_path_buf();
    tonic::transport::Endpoint::try_from("http://localhost")
        .map_err(|e| fail(e.to_string()))?
        .connect_with_connector(tower::service_fn(move |_| {
            let path = path.clone();
            async move { Ok::<_, io::Error>(TokioIo::new(tokio::net::UnixStream::connect(path).await?)) }
        }))
        .await
        .map_err(|e| fail(crate::tls::source_chain(&e)))
}

/// A server-side connection and what we learnt about its peer when it was accepted; tonic
/// hands `info` to every request on it (`request.extensions().get::<I>()`).
#[derive(Debug)]
pub struct ConnWithInfo<S, I> {
    inner: S,
    info: I,
}

impl<S, I> ConnWithInfo<S, I> {
    pub fn new(inner: S, info: I) -> Self {
        Self { inner, info }
    }
}

impl<S, I> tonic::transport::server::Connected for ConnWithInfo<S, I>
where
    I: Clone + Send + Sync + 'static,
{
    type ConnectInfo = I;

    fn connect_info(&self) -> I {
        self.info.clone()
    }
}

impl<S: AsyncRead + Unpin, I: Unpin> AsyncRead for ConnWithInfo<S, I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

forward_async_write!(ConnWithInfo<S, I>, S, I);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_dirs_of_others_or_writable_by_others_are_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("sockets");
        assert!(check_socket_dir(&d).is_ok(), "missing: will be created");
        std::fs::create_dir(&d).unwrap();
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert!(check_socket_dir(&d).is_ok());
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o777)).unwrap();
        assert!(check_socket_dir(&d)
            .unwrap_err()
            .contains("writable by other users"));
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o1777)).unwrap();
        assert!(check_socket_dir(&d).is_ok(), "sticky, like /tmp");
        assert!(check_socket_dir(Path::new("/tmp")).is_ok());
    }

    #[test]
    fn a_live_socket_is_not_taken_over_but_a_stale_one_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        assert!(clear_socket_path(&path).is_ok(), "nothing there");
        let live = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let err = clear_socket_path(&path).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse);
        assert!(path.exists(), "the live socket stays");
        drop(live);
        clear_socket_path(&path).unwrap();
        assert!(!path.exists(), "a stale socket file is removed");
    }

    #[tokio::test]
    async fn unix_channel_names_the_socket_it_could_not_reach() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("none.sock");
        let err = unix_channel(&missing).await.unwrap_err();
        assert_eq!(err.path, missing.display().to_string());
        assert!(err.to_string().starts_with("cannot connect to "), "{err}");
    }
}
