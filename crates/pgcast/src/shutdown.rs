//! Graceful shutdown: one signal that every task listens to (as in mini-redis's `shutdown.rs`).
//!
//! [`ShutdownTrigger::trigger`] fires it once; each task holds a [`Shutdown`] and stops its work
//! when [`Shutdown::wait`] returns. This module does not decide *when* to shut down (`server` does,
//! on SIGTERM/SIGINT) nor how each task cleans up.

use tokio::sync::watch;

/// Fires the shutdown signal.
#[derive(Clone)]
pub struct ShutdownTrigger {
    tx: watch::Sender<bool>,
}

/// Listens for the shutdown signal. Cheap to clone; one per task.
#[derive(Clone)]
pub struct Shutdown {
    rx: watch::Receiver<bool>,
}

pub fn channel() -> (ShutdownTrigger, Shutdown) {
    let (tx, rx) = watch::channel(false);
    (ShutdownTrigger { tx }, Shutdown { rx })
}

impl ShutdownTrigger {
    pub fn trigger(&self) {
        self.tx.send_replace(true);
    }
}

impl Shutdown {
    pub fn is_triggered(&self) -> bool {
        *self.rx.borrow()
    }

    /// Returns once shutdown was triggered (at once if it already was).
    pub async fn wait(&mut self) {
        // `changed` rather than `wait_for`: this future sits in every connection's task, and
        // `wait_for`'s is twice the size.
        while !*self.rx.borrow_and_update() {
            // An error means every trigger was dropped: treat it as shutdown too.
            if self.rx.changed().await.is_err() {
                return;
            }
        }
    }
}
