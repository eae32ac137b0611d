//! The shape every daemon shares: components are `run(shutdown)` tasks in one `JoinSet`; the
//! first to finish (or fail) cancels the others, and shutdown is bounded.

use std::time::Duration;

use tokio::task::{JoinError, JoinSet};
use tokio_util::sync::CancellationToken;

/// How long components get to stop after cancellation before they are aborted.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// A component task that panicked or was aborted.
#[derive(Debug, thiserror::Error)]
#[error("component task failed: {0}")]
pub struct TaskFailed(pub String);

fn flatten<E: From<TaskFailed>>(r: Result<Result<(), E>, JoinError>) -> Result<(), E> {
    match r {
        Ok(inner) => inner,
        Err(e) => Err(E::from(TaskFailed(e.to_string()))),
    }
}

/// Waits for the first task to finish, cancels `stop`, and waits (bounded) for the rest.
/// Returns the first error.
pub async fn supervise<E: From<TaskFailed> + 'static>(
    tasks: &mut JoinSet<Result<(), E>>,
    stop: &CancellationToken,
) -> Result<(), E> {
    let mut result = Ok(());
    if let Some(first) = tasks.join_next().await {
        result = flatten(first);
    }
    stop.cancel();
    let drain = async {
        while let Some(r) = tasks.join_next().await {
            if result.is_ok() {
                result = flatten(r);
            }
        }
    };
    if tokio::time::timeout(SHUTDOWN_GRACE, drain).await.is_err() {
        tracing::warn!("components did not stop within the grace period; aborting them");
        tasks.abort_all();
    }
    result
}

/// Refuses to put a socket into an existing directory that another user controls: whoever
/// owns (or may write to) the directory could swap the socket for their own. A directory
/// owned by us or root, not writable by others (or sticky, like /tmp), is fine.
pub fn check_socket_dir(dir: &std::path::Path) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    let meta = match std::fs::metadata(dir) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e.to_string()),
    };
    let own = std::fs::metadata("/proc/self")
        .map(|m| m.uid())
        .unwrap_or(0);
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
        assert!(check_socket_dir(std::path::Path::new("/tmp")).is_ok());
    }

    #[tokio::test]
    async fn first_failure_cancels_the_rest() {
        let stop = CancellationToken::new();
        let mut tasks: JoinSet<Result<(), TaskFailed>> = JoinSet::new();
        let s = stop.clone();
        tasks.spawn(async move {
            s.cancelled().await;
            Ok(())
        });
        tasks.spawn(async { Err(TaskFailed("boom".into())) });
        let r = supervise(&mut tasks, &stop).await;
        assert_eq!(r.unwrap_err().0, "boom");
        assert!(stop.is_cancelled());
    }
}
