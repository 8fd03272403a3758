//! The router: for each captured change, which subscribers receive it and the bytes they get.
//!
//! [`run`] takes transactions in commit order, matches each change through the [`index::Index`],
//! serializes each distinct message once (per topic, binding ids and serializer) and hands the
//! shared bytes to each session's bounded queue. Once a whole transaction is routed it marks the
//! transaction handled in [`Progress`], which is what lets capture confirm the slot.
//!
//! Architecture invariant: the router never touches the database and never waits on a client; a
//! full client queue cuts that client off (see `session`).

pub mod filter;
pub mod index;
pub mod payload;

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use axum::extract::ws::Utf8Bytes;
use tokio::sync::mpsc;

use crate::capture::{Change, Progress, Transaction};
use crate::protocol::phoenix::{self, Vsn};
use crate::session::{Outbound, SessionHandle};
use index::{Index, Subscription};

/// Routes until the capture side closes the channel.
pub async fn run(
    mut changes: mpsc::Receiver<Transaction>,
    index: Arc<RwLock<Index>>,
    progress: Arc<Progress>,
) {
    let mut fanout = Fanout::default();
    while let Some(tx) = changes.recv().await {
        for change in &tx.changes {
            fanout.route(&tx, change, &index);
        }
        progress.mark_handled(tx.end_lsn);
    }
}

/// One recipient of a change: a session and the binding ids it gets on one topic.
type Target = (Arc<SessionHandle>, Vec<u32>);

/// Scratch space reused across changes so routing does not allocate per subscriber.
#[derive(Default)]
pub struct Fanout {
    matched: Vec<Arc<Subscription>>,
    /// (session id, topic) -> recipient.
    targets: HashMap<(u64, Arc<str>), Target>,
    /// (topic, ids, serializer) -> the serialized message shared by all its recipients.
    encoded: HashMap<(Arc<str>, Vec<u32>, Vsn), Utf8Bytes>,
}

impl Fanout {
    /// Delivers one change; returns how many connections it was queued for.
    pub fn route(&mut self, tx: &Transaction, change: &Change, index: &RwLock<Index>) -> usize {
        self.matched.clear();
        match index.read() {
            Ok(index) => index.matches(change, &mut self.matched),
            Err(poisoned) => poisoned.into_inner().matches(change, &mut self.matched),
        }
        if self.matched.is_empty() {
            return 0;
        }
        self.targets.clear();
        self.encoded.clear();
        for sub in self.matched.drain(..) {
            let (_, ids) = self
                .targets
                .entry((sub.session.id, sub.topic.clone()))
                .or_insert_with(|| (sub.session.clone(), Vec::new()));
            if !ids.contains(&sub.binding_id) {
                ids.push(sub.binding_id);
            }
        }
        let data = payload::change_data(tx, change);
        let mut delivered = 0;
        for ((_, topic), (session, ids)) in self.targets.iter_mut() {
            ids.sort_unstable();
            let key = (topic.clone(), ids.clone(), session.vsn);
            let text = self
                .encoded
                .entry(key)
                .or_insert_with(|| {
                    let body = payload::message_payload(ids, &data);
                    phoenix::encode_raw(session.vsn, None, None, topic, "postgres_changes", &body).into()
                })
                .clone();
            if session.deliver(Outbound { text, commit_time_micros: tx.commit_time_micros }) {
                delivered += 1;
            }
        }
        delivered
    }
}
