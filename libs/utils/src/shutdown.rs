//! Graceful shutdown: one token per process, cancelled on SIGINT/SIGTERM or by code, that tasks
//! select on to stop at a safe point.

use tokio_util::sync::CancellationToken;

/// Cancelled when the process should stop. Clone freely; child tokens stop with their parent.
pub type ShutdownToken = CancellationToken;

/// Returns a token that is cancelled on the first SIGINT or SIGTERM. A second signal is not
/// intercepted: the default action (exit) then applies, so a stuck shutdown can be forced.
pub fn on_signals() -> std::io::Result<ShutdownToken> {
    use tokio::signal::unix::{signal, SignalKind};
    let token = CancellationToken::new();
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let t = token.clone();
    tokio::spawn(async move {
        let name = tokio::select! {
            _ = sigint.recv() => "SIGINT",
            _ = sigterm.recv() => "SIGTERM",
        };
        tracing::info!("received {name}, shutting down");
        t.cancel();
    });
    Ok(token)
}

#[cfg(test)]
mod tests {
    #[tokio::test]
    async fn child_tokens_follow_parent() {
        let parent = super::ShutdownToken::new();
        let child = parent.child_token();
        assert!(!child.is_cancelled());
        parent.cancel();
        child.cancelled().await;
        assert!(child.is_cancelled());
    }
}
