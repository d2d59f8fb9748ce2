//! Graceful shutdown: the first SIGINT/SIGTERM (or the first failing service) cancels the
//! shared token; services finish their in-flight batch and return. A second signal exits
//! at once with status 130.

use tokio_util::sync::CancellationToken;

/// A cloneable shutdown signal, injected into every `run` so tests control it.
#[derive(Clone, Debug, Default)]
pub struct Shutdown {
    token: CancellationToken,
}

impl Shutdown {
    pub fn new() -> Self {
        Self::default()
    }

    /// Asks every holder to stop.
    pub fn trigger(&self) {
        self.token.cancel();
    }

    pub fn is_triggered(&self) -> bool {
        self.token.is_cancelled()
    }

    /// Resolves once shutdown was asked for.
    pub async fn wait(&self) {
        self.token.cancelled().await;
    }

    /// Triggers on the first SIGINT or SIGTERM; exits the process on the second.
    pub fn listen_for_signals(&self) -> std::io::Result<()> {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let this = self.clone();
        tokio::spawn(async move {
            let mut seen = 0;
            loop {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
                seen += 1;
                if seen == 1 {
                    tracing::info!("shutdown requested: finishing in-flight work (signal again to exit at once)");
                    this.trigger();
                } else {
                    tracing::warn!("second signal: exiting without finishing");
                    std::process::exit(130);
                }
            }
        });
        Ok(())
    }
}
