//! The router: for each captured change, which subscribers receive it and the bytes they get.
//!
//! [`run`] takes transactions in commit order, matches each change through the [`index::Index`],
//! serializes each distinct message once (per topic, binding ids, shape and wire format, which
//! is all it knows of a connection's protocol) and hands the shared bytes to each session's
//! bounded queue. Once a whole transaction is routed it marks the
//! transaction handled in [`Progress`], which is what lets capture confirm the slot.
//!
//! Architecture invariant: the router never touches the database and never waits on a client; a
//! full client queue cuts that client off (see `outbound`).

pub mod filter;
pub mod index;
pub mod payload;
pub mod policy;
pub mod runs;

use std::ops::Range;
use std::sync::{Arc, RwLock};

use axum::extract::ws::Message;
use tokio::sync::mpsc;

use crate::capture::{Change, Progress, Transaction};
use crate::log::{History, Position};
use crate::outbound::{Frames, Outbound, SessionHandle};
use crate::protocol;
use index::{Index, Subscription};
use payload::View;
use policy::{RlsIdentity, Visibility, FULL_SHAPE_ID, LEFT_VIEW_SHAPE_ID};

use crate::rls::RlsChecker;

/// Routes until the capture side closes the channel. Each transaction is appended to the
/// history and routed while the history lock is held, so a resuming session (which snapshots
/// the history and subscribes under the same lock) sees every change exactly once: replayed or
/// live. A transaction the history already has (streamed again after a reconnect) is not routed
/// again. `rls` is set when a table uses row-level security mode.
pub async fn run(
    mut changes: mpsc::Receiver<Transaction>,
    index: Arc<RwLock<Index>>,
    history: Arc<tokio::sync::Mutex<History>>,
    progress: Arc<Progress>,
    rls: Option<Arc<RlsChecker>>,
) {
    let mut fanout = Fanout::default();
    let mut runs = runs::Runs::default();
    let commit_to_route = metrics::histogram!("pgcast_commit_to_route_seconds");
    let mut prune = tokio::time::interval(std::time::Duration::from_secs(1));
    loop {
        let tx = tokio::select! {
            tx = changes.recv() => match tx {
                Some(tx) => Arc::new(tx),
                None => return,
            },
            _ = prune.tick() => {
                history.lock().await.prune(crate::clock::now_micros(), &progress);
                continue;
            }
        };
        let mut history = history.lock().await;
        // A transaction streamed again after a reconnect was already routed by this server.
        let now = crate::clock::now_micros();
        let new = history.append(tx.clone(), now, &progress);
        if new {
            commit_to_route.record((now - tx.commit_time_micros).max(0) as f64 / 1e6);
            let epoch = history.epoch().to_string();
            if let [change] = tx.changes.as_slice() {
                let position = Position { lsn: tx.commit_lsn, index: 0 };
                let mut deliver = |session: &Arc<SessionHandle>, message: Message| {
                    session.deliver(Outbound {
                        frames: Frames::One(message),
                        commit_time_micros: tx.commit_time_micros,
                    })
                };
                fanout.route(&tx, change, position, &epoch, &index, rls.as_deref(), &mut deliver).await;
            } else {
                // A session gets a multi-change transaction as one queue entry, shared with
                // the sessions that get the same messages: a large transaction then counts
                // once against a subscriber's queue and is held once in memory.
                for (i, change) in tx.changes.iter().enumerate() {
                    let position = Position { lsn: tx.commit_lsn, index: i as u32 };
                    let mut gather = |session: &Arc<SessionHandle>, message: Message| {
                        runs.push(session, message);
                        true
                    };
                    fanout.route(&tx, change, position, &epoch, &index, rls.as_deref(), &mut gather).await;
                }
                runs.deliver(tx.commit_time_micros);
            }
        }
        drop(history);
        progress.mark_handled(tx.end_lsn);
    }
}

/// Scratch space reused across changes so routing does not allocate per subscriber.
#[derive(Default)]
pub struct Fanout {
    matched: Vec<(Arc<Subscription>, Visibility)>,
    /// The matched subscriptions due this change, each with its view's shape id.
    hits: Vec<(Arc<Subscription>, u32)>,
    /// shape id -> the view and its serialized `data`, made when first needed. Few per change.
    views: Vec<(u32, Visibility, Option<String>)>,
    /// A table event's argument (`payload::event_data`) per (shape, route's binding id), made
    /// when first needed.
    event_data: Vec<(u32, u32, String)>,
    /// The binding ids of every recipient; each recipient owns a range of it.
    ids: Vec<u32>,
    /// One message each: the index in `hits` of its first hit (session, topic, shape) and the
    /// range of its binding ids.
    recipients: Vec<(usize, Range<usize>)>,
}

fn shape_id(visibility: &Visibility) -> u32 {
    match visibility {
        Visibility::Visible(None) | Visibility::Hidden => FULL_SHAPE_ID,
        Visibility::Visible(Some(spec)) => spec.id,
        Visibility::LeftView(_) => LEFT_VIEW_SHAPE_ID,
        Visibility::NeedsRls(spec, _) => spec.id,
    }
}

/// Topics are shared `Arc`s, so equal ones are usually the same pointer.
fn cmp_topic(a: &Arc<str>, b: &Arc<str>) -> std::cmp::Ordering {
    if Arc::ptr_eq(a, b) {
        std::cmp::Ordering::Equal
    } else {
        a.cmp(b)
    }
}

/// The messages a resuming subscriber missed, in order: `entries` (from `History::since`)
/// routed through an index of only `subscriptions`, with the same policies and encoding as
/// live delivery. Written by the session before anything queued live.
pub async fn replay(
    subscriptions: &[Arc<Subscription>],
    entries: &[(Position, Arc<Transaction>, usize)],
    epoch: &str,
    rls: Option<&RlsChecker>,
) -> Vec<Message> {
    let mut index = Index::default();
    for sub in subscriptions {
        index.insert(sub.clone());
    }
    let index = RwLock::new(index);
    let mut fanout = Fanout::default();
    let mut messages = Vec::new();
    for (position, tx, i) in entries {
        let mut collect = |_: &Arc<SessionHandle>, message: Message| {
            messages.push(message);
            true
        };
        fanout.route(tx, &tx.changes[*i], *position, epoch, &index, rls, &mut collect).await;
    }
    messages
}

impl Fanout {
    /// Delivers one change through `deliver`; returns how many connections accepted it.
    ///
    /// A session gets one message per topic and shape, listing every binding id of its that
    /// matched; each distinct message (topic, ids, serializer, shape) is serialized once and its
    /// bytes shared. Grouping is done by sorting scratch vectors, so routing a change allocates
    /// per distinct message, not per recipient.
    #[allow(clippy::too_many_arguments)]
    pub async fn route(
        &mut self,
        tx: &Transaction,
        change: &Change,
        position: Position,
        epoch: &str,
        index: &RwLock<Index>,
        rls: Option<&RlsChecker>,
        deliver: &mut (dyn FnMut(&Arc<SessionHandle>, Message) -> bool + Send),
    ) -> usize {
        self.matched.clear();
        match index.read() {
            Ok(index) => index.matches(change, &mut self.matched),
            Err(poisoned) => poisoned.into_inner().matches(change, &mut self.matched),
        }
        if self.matched.is_empty() {
            return 0;
        }
        if self.matched.iter().any(|(_, v)| matches!(v, Visibility::NeedsRls(..))) {
            self.resolve_rls(change, rls).await;
        }
        let Fanout { matched, hits, views, event_data, ids, recipients } = self;
        hits.clear();
        views.clear();
        event_data.clear();
        ids.clear();
        recipients.clear();
        for (sub, visibility) in matched.drain(..) {
            if sub.min_position.is_some_and(|floor| position <= floor) {
                continue;
            }
            let shape = shape_id(&visibility);
            if !views.iter().any(|(id, ..)| *id == shape) {
                views.push((shape, visibility, None));
            }
            hits.push((sub, shape));
        }

        // One recipient per (session, topic, shape), with its binding ids sorted and distinct.
        hits.sort_unstable_by(|(a, shape_a), (b, shape_b)| {
            (a.session.id.cmp(&b.session.id))
                .then_with(|| cmp_topic(a.group(), b.group()))
                .then(shape_a.cmp(shape_b))
                .then(a.binding_id.cmp(&b.binding_id))
        });
        let mut first = 0;
        while first < hits.len() {
            let (lead, shape) = &hits[first];
            let start = ids.len();
            let mut next = first;
            while let Some((sub, sub_shape)) = hits.get(next) {
                let same = sub.session.id == lead.session.id
                    && sub_shape == shape
                    && cmp_topic(sub.group(), lead.group()).is_eq();
                if !same {
                    break;
                }
                if ids.len() == start || ids.last() != Some(&sub.binding_id) {
                    ids.push(sub.binding_id);
                }
                next += 1;
            }
            recipients.push((first, start..ids.len()));
            first = next;
        }

        // Recipients of the same message next to each other, so it is serialized once.
        let same_message = |(a, ids_a): &(usize, Range<usize>), (b, ids_b): &(usize, Range<usize>)| {
            let ((sub_a, shape_a), (sub_b, shape_b)) = (&hits[*a], &hits[*b]);
            cmp_topic(sub_a.group(), sub_b.group())
                .then_with(|| ids[ids_a.clone()].cmp(&ids[ids_b.clone()]))
                .then(sub_a.session.wire.cmp(&sub_b.session.wire))
                .then(shape_a.cmp(shape_b))
        };
        recipients.sort_unstable_by(same_message);
        let mut delivered = 0;
        let mut last: Option<(usize, Message)> = None;
        for (r, recipient) in recipients.iter().enumerate() {
            let (sub, shape) = &hits[recipient.0];
            let message = match &last {
                Some((previous, message)) if same_message(&recipients[*previous], recipient).is_eq() => {
                    message.clone()
                }
                _ => {
                    let Some((_, visibility, data)) = views.iter_mut().find(|(id, ..)| id == shape) else {
                        continue;
                    };
                    let view = match visibility {
                        Visibility::Visible(Some(spec)) => View::Shaped(spec),
                        Visibility::LeftView(primary_key) => View::LeftView(primary_key),
                        Visibility::Visible(None) | Visibility::Hidden => View::Full,
                        Visibility::NeedsRls(spec, _) => View::Shaped(spec),
                    };
                    let message = match &sub.event {
                        None => {
                            let data = data.get_or_insert_with(|| {
                                payload::change_data(tx, change, view, position, epoch)
                            });
                            let ids = &ids[recipient.1.clone()];
                            protocol::change(sub.session.wire, &sub.topic, ids, data, position, epoch)
                        }
                        Some(event) => {
                            let route = event.binding_id;
                            let at = match event_data.iter().position(|(s, r, _)| s == shape && *r == route) {
                                Some(at) => at,
                                None => {
                                    event_data.push((
                                        *shape,
                                        route,
                                        payload::event_data(change, view, &event.key),
                                    ));
                                    event_data.len() - 1
                                }
                            };
                            protocol::table_event(
                                sub.session.wire,
                                &sub.topic,
                                event.name(view.kind(change)),
                                &event_data[at].2,
                                position,
                                route,
                            )
                        }
                    };
                    last = Some((r, message.clone()));
                    message
                }
            };
            if deliver(&sub.session, message) {
                delivered += 1;
            }
        }
        // The subscriptions are not held on to until the next change.
        hits.clear();
        delivered
    }

    /// Asks PostgreSQL, once for all candidates, which RLS-mode subscribers may see the row;
    /// the others are dropped. On error nobody in RLS mode gets the change (fail closed).
    async fn resolve_rls(&mut self, change: &Change, rls: Option<&RlsChecker>) {
        let mut identities: Vec<Arc<RlsIdentity>> = Vec::new();
        let mut primary_key: Option<Arc<[String]>> = None;
        for (_, visibility) in &self.matched {
            if let Visibility::NeedsRls(spec, identity) = visibility {
                primary_key.get_or_insert_with(|| spec.primary_key.clone());
                if !identities.contains(identity) {
                    identities.push(identity.clone());
                }
            }
        }
        let verdicts = match (rls, &primary_key) {
            (Some(rls), Some(primary_key)) => match rls.visible(change, primary_key, &identities).await {
                Ok(verdicts) => verdicts,
                Err(e) => {
                    tracing::warn!(error = %e, table = %change.relation.name, "row-level security check failed; change withheld");
                    metrics::counter!("pgcast_rls_errors_total").increment(1);
                    vec![false; identities.len()]
                }
            },
            _ => vec![false; identities.len()],
        };
        self.matched.retain_mut(|(_, visibility)| {
            let Visibility::NeedsRls(spec, identity) = visibility else { return true };
            let allowed =
                identities.iter().position(|i| i == identity).and_then(|i| verdicts.get(i)) == Some(&true);
            if allowed {
                *visibility = Visibility::Visible(Some(spec.clone()));
            }
            allowed
        });
    }
}
