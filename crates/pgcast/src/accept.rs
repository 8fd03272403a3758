//! The HTTP accept loop: what `axum::serve` does (HTTP/1.1 with upgrades, the client's address
//! for handlers, graceful shutdown), plus the two bounds it cannot set.
//!
//! - **Time to a complete request head**: a connection has `http_header_timeout` after it is
//!   accepted (and after each response, while kept alive) to send a whole request head, the
//!   WebSocket upgrade included; hyper closes it otherwise. Without it a socket sending one
//!   header byte every half second, or nothing, was held until the file limit ran out.
//! - **Connections still waiting to send one**: at most `max_pending_connections`, and at most
//!   `max_pending_connections_per_ip` from one address; a connection accepted past either is
//!   closed at once, and counted.
//!
//! Routing, authentication and WebSocket sessions are not decided here (`http`, `session`).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::Router;
use hyper::body::Incoming;
use hyper::Request;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tower_service::Service;

use crate::shutdown::Shutdown;

/// What bounds a connection before it has sent a complete request.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub header_timeout: Duration,
    pub max_pending: usize,
    /// Per client address, so that one source cannot take every pending place and lock
    /// everyone else out (a global bound alone would be a lever for exactly that).
    pub max_pending_per_ip: usize,
}

/// The connections that have not yet sent a complete request head, in all and per address.
struct Pending {
    total: Arc<Semaphore>,
    per_ip: Mutex<HashMap<IpAddr, usize>>,
    max_per_ip: usize,
}

/// One pending connection's place; given back when dropped.
struct PendingSlot {
    pending: Arc<Pending>,
    ip: IpAddr,
    _total: OwnedSemaphorePermit,
}

impl Pending {
    fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<PendingSlot, &'static str> {
        let total = self.total.clone().try_acquire_owned().map_err(|_| "pending")?;
        let mut per_ip = self.per_ip.lock().unwrap_or_else(|p| p.into_inner());
        let count = per_ip.entry(ip).or_insert(0);
        if *count >= self.max_per_ip {
            return Err("pending_per_ip");
        }
        *count += 1;
        Ok(PendingSlot { pending: self.clone(), ip, _total: total })
    }
}

impl Drop for PendingSlot {
    fn drop(&mut self) {
        let mut per_ip = self.pending.per_ip.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(count) = per_ip.get_mut(&self.ip) {
            *count -= 1;
            if *count == 0 {
                per_ip.remove(&self.ip);
            }
        }
    }
}

/// Serves `app` on `listener` until `shutdown`, then lets open requests finish.
pub async fn serve(listener: TcpListener, app: Router, limits: Limits, mut shutdown: Shutdown) {
    let pending = Arc::new(Pending {
        total: Arc::new(Semaphore::new(limits.max_pending)),
        per_ip: Mutex::new(HashMap::new()),
        max_per_ip: limits.max_pending_per_ip,
    });
    // Each connection task holds a receiver; shutdown waits until all are gone.
    let (open_tx, open_rx) = watch::channel(());
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = shutdown.wait() => break,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of file descriptors (EMFILE) or a connection reset before it was taken:
                // back off a moment instead of spinning on the error.
                tracing::debug!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        let permit = match pending.admit(peer.ip()) {
            Ok(slot) => slot,
            Err(reason) => {
                metrics::counter!("pgcast_connections_refused_total", "reason" => reason).increment(1);
                tracing::debug!(peer = %peer, reason, "too many connections without a complete request; closed");
                continue;
            }
        };
        // Sessions batch their writes themselves; Nagle's algorithm would hold a small frame
        // back until the client's delayed ACK (up to 40 ms on Linux).
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(error = %e, "could not set TCP_NODELAY");
        }
        let app = app.clone();
        let open = open_rx.clone();
        let mut shutdown = shutdown.clone();
        tokio::spawn(async move {
            // The pending permit is given back when the first request's head is complete
            // (hyper calls the service only then), or when the connection ends.
            let permit = Mutex::new(Some(permit));
            let service = hyper::service::service_fn(move |mut request: Request<Incoming>| {
                if let Ok(mut permit) = permit.lock() {
                    permit.take();
                }
                request.extensions_mut().insert(ConnectInfo(peer));
                app.clone().call(request)
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_timeout)
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades();
            let mut connection = std::pin::pin!(connection);
            tokio::select! {
                _ = connection.as_mut() => {}
                _ = shutdown.wait() => {
                    connection.as_mut().graceful_shutdown();
                    let _ = connection.await;
                }
            }
            drop(open);
        });
    }
    drop(open_rx);
    open_tx.closed().await;
}
