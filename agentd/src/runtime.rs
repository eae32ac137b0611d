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

#[cfg(test)]
mod tests {
    use super::*;

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
