//! A shutdown signal passed in as a value, and the process signals that
//! usually fire it.
//!
//! One [`ShutdownTrigger`] fires; any number of [`Shutdown`] clones observe.
//! The signal is a `tokio::sync::watch` channel holding `false` until
//! triggered, so a late observer still sees a shutdown that happened before
//! it looked, and dropping the trigger (its owner is gone, so nobody can
//! trigger any more) counts as a shutdown rather than leaving waiters hanging.

use tokio::sync::watch;

/// The side that starts a shutdown. Owned by whoever decides the process is
/// stopping (usually `main`, on a signal); dropping it also shuts down every
/// [`Shutdown`] observer.
#[derive(Debug)]
pub struct ShutdownTrigger {
    tx: watch::Sender<bool>,
}

/// The side that observes a shutdown: cheap to clone, one per task that must
/// stop when the process stops.
#[derive(Debug, Clone)]
pub struct Shutdown {
    rx: watch::Receiver<bool>,
}

impl Shutdown {
    /// Creates a signal that has not fired: the trigger and a first observer
    /// (clone it for more).
    pub fn new() -> (ShutdownTrigger, Shutdown) {
        let (tx, rx) = watch::channel(false);
        (ShutdownTrigger { tx }, Shutdown { rx })
    }

    /// Whether shutdown has begun: the trigger fired, or was dropped without
    /// firing. Agrees with [`Shutdown::wait`], which returns at once exactly
    /// when this is `true`.
    pub fn is_triggered(&self) -> bool {
        // `has_changed` fails only once the sender is gone.
        *self.rx.borrow() || self.rx.has_changed().is_err()
    }

    /// Waits until shutdown begins; returns at once if it already has.
    ///
    /// Takes `&self` (waiting on a private clone of the receiver) so that one
    /// `Shutdown` can be awaited in several places, e.g. both in a
    /// `select!` arm and in a graceful-shutdown future.
    pub async fn wait(&self) {
        let mut rx = self.rx.clone();
        // `wait_for` looks at the current value first, so a trigger that fired
        // before this call is not missed; its error means the trigger was
        // dropped, which is a shutdown too.
        let _ = rx.wait_for(|triggered| *triggered).await;
    }
}

impl Shutdown {
    /// A signal that fires `delay` after this one does (the same signal if
    /// `delay` is zero): for what must stop only once a drain delay is over.
    /// Spawns a task, so call it inside a tokio runtime.
    pub fn delayed(&self, delay: std::time::Duration) -> Shutdown {
        if delay.is_zero() {
            return self.clone();
        }
        let (trigger, later) = Shutdown::new();
        let first = self.clone();
        tokio::spawn(async move {
            first.wait().await;
            tokio::time::sleep(delay).await;
            trigger.trigger();
        });
        later
    }
}

impl ShutdownTrigger {
    /// Starts the shutdown: every [`Shutdown`] observer, present or future,
    /// sees it. Triggering again does nothing more.
    pub fn trigger(&self) {
        // `send_replace` stores the value even when no observer is left.
        self.tx.send_replace(true);
    }
}

/// Waits for SIGINT (Ctrl-C) or, on Unix, SIGTERM (what container runtimes
/// and `docker stop` send), whichever comes first.
///
/// If a handler cannot be installed, that signal is logged and ignored
/// rather than treated as received: returning would shut the process down
/// at start-up.
pub async fn ctrl_c_or_term() {
    let ctrl_c = async {
        match tokio::signal::ctrl_c().await {
            Ok(()) => tracing::info!("received SIGINT"),
            Err(err) => {
                tracing::warn!(%err, "cannot listen for SIGINT; ignoring it");
                std::future::pending::<()>().await;
            }
        }
    };

    #[cfg(unix)]
    let term = async {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                term.recv().await;
                tracing::info!("received SIGTERM");
            }
            Err(err) => {
                tracing::warn!(%err, "cannot listen for SIGTERM; ignoring it");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();

    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    const DEADLINE: Duration = Duration::from_secs(5);

    #[tokio::test]
    async fn wait_returns_after_trigger_for_every_clone() {
        let (trigger, shutdown) = Shutdown::new();
        let other = shutdown.clone();
        assert!(!shutdown.is_triggered());

        let waiter = tokio::spawn(async move { other.wait().await });
        trigger.trigger();
        tokio::time::timeout(DEADLINE, waiter)
            .await
            .expect("waiter did not see the trigger")
            .expect("waiter panicked");
        assert!(shutdown.is_triggered());
    }

    #[tokio::test]
    async fn wait_returns_at_once_when_already_triggered() {
        let (trigger, shutdown) = Shutdown::new();
        trigger.trigger();
        let late = shutdown.clone();
        tokio::time::timeout(DEADLINE, late.wait())
            .await
            .expect("an already-triggered shutdown must not block");
        // Twice: waiting does not consume the signal.
        tokio::time::timeout(DEADLINE, late.wait())
            .await
            .expect("waiting twice must not block");
    }

    #[tokio::test]
    async fn dropping_the_trigger_counts_as_shutdown() {
        let (trigger, shutdown) = Shutdown::new();
        drop(trigger);
        assert!(shutdown.is_triggered());
        tokio::time::timeout(DEADLINE, shutdown.wait())
            .await
            .expect("a dropped trigger must release waiters");
    }
}
