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
pub mod policy;

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use axum::extract::ws::{Message, Utf8Bytes};
use tokio::sync::mpsc;

use crate::capture::{Change, Progress, Transaction};
use crate::protocol::phoenix::{self, Vsn};
use crate::session::{Outbound, SessionHandle};
use index::{Index, Subscription};
use payload::View;
use policy::{Visibility, FULL_SHAPE_ID, LEFT_VIEW_SHAPE_ID};

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
    matched: Vec<(Arc<Subscription>, Visibility)>,
    /// (session id, topic, shape id) -> recipient.
    targets: HashMap<(u64, Arc<str>, u32), Target>,
    /// shape id -> the view and its serialized `data`.
    views: HashMap<u32, (Visibility, Option<String>)>,
    /// (topic, ids, serializer, shape id) -> the serialized message shared by its recipients.
    encoded: HashMap<(Arc<str>, Vec<u32>, Vsn, u32), Utf8Bytes>,
}

fn shape_id(visibility: &Visibility) -> u32 {
    match visibility {
        Visibility::Visible(None) | Visibility::Hidden => FULL_SHAPE_ID,
        Visibility::Visible(Some(spec)) => spec.id,
        Visibility::LeftView(_) => LEFT_VIEW_SHAPE_ID,
    }
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
        self.views.clear();
        self.encoded.clear();
        for (sub, visibility) in self.matched.drain(..) {
            let shape = shape_id(&visibility);
            self.views.entry(shape).or_insert((visibility, None));
            let (_, ids) = self
                .targets
                .entry((sub.session.id, sub.topic.clone(), shape))
                .or_insert_with(|| (sub.session.clone(), Vec::new()));
            if !ids.contains(&sub.binding_id) {
                ids.push(sub.binding_id);
            }
        }
        let mut delivered = 0;
        for ((_, topic, shape), (session, ids)) in self.targets.iter_mut() {
            ids.sort_unstable();
            let key = (topic.clone(), ids.clone(), session.vsn, *shape);
            let text = match self.encoded.get(&key) {
                Some(text) => text.clone(),
                None => {
                    let Some((visibility, data)) = self.views.get_mut(shape) else { continue };
                    let data = data.get_or_insert_with(|| {
                        let view = match visibility {
                            Visibility::Visible(Some(spec)) => View::Shaped(spec),
                            Visibility::LeftView(primary_key) => View::LeftView(primary_key),
                            Visibility::Visible(None) | Visibility::Hidden => View::Full,
                        };
                        payload::change_data(tx, change, view)
                    });
                    let body = payload::message_payload(ids, data);
                    let text: Utf8Bytes =
                        phoenix::encode_raw(session.vsn, None, None, topic, "postgres_changes", &body).into();
                    self.encoded.insert(key, text.clone());
                    text
                }
            };
            let message =
                Outbound { message: Message::Text(text), commit_time_micros: tx.commit_time_micros };
            if session.deliver(message) {
                delivered += 1;
            }
        }
        delivered
    }
}
