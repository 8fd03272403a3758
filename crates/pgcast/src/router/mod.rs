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
use crate::log::{History, Position};
use crate::protocol::phoenix::{self, Vsn};
use crate::session::{Outbound, SessionHandle};
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
    let mut prune = tokio::time::interval(std::time::Duration::from_secs(1));
    loop {
        let tx = tokio::select! {
            tx = changes.recv() => match tx {
                Some(tx) => Arc::new(tx),
                None => return,
            },
            _ = prune.tick() => {
                history.lock().await.prune(crate::server::now_micros(), &progress);
                continue;
            }
        };
        let mut history = history.lock().await;
        // A transaction streamed again after a reconnect was already routed by this server.
        let new = history.append(tx.clone(), crate::server::now_micros(), &progress);
        if new {
            let epoch = history.epoch().to_string();
            for (i, change) in tx.changes.iter().enumerate() {
                let position = Position { lsn: tx.commit_lsn, index: i as u32 };
                let mut deliver = |session: &Arc<SessionHandle>, message: Message| {
                    session.deliver(Outbound { message, commit_time_micros: tx.commit_time_micros })
                };
                fanout.route(&tx, change, position, &epoch, &index, rls.as_deref(), &mut deliver).await;
            }
        }
        drop(history);
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
        Visibility::NeedsRls(spec, _) => spec.id,
    }
}

impl Fanout {
    /// Delivers one change through `deliver`; returns how many connections accepted it.
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
        self.targets.clear();
        self.views.clear();
        self.encoded.clear();
        for (sub, visibility) in self.matched.drain(..) {
            if sub.min_position.is_some_and(|floor| position <= floor) {
                continue;
            }
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
                            Visibility::NeedsRls(spec, _) => View::Shaped(spec),
                        };
                        payload::change_data(tx, change, view, position, epoch)
                    });
                    let body = payload::message_payload(ids, data);
                    let text: Utf8Bytes =
                        phoenix::encode_raw(session.vsn, None, None, topic, "postgres_changes", &body).into();
                    self.encoded.insert(key, text.clone());
                    text
                }
            };
            if deliver(session, Message::Text(text)) {
                delivered += 1;
            }
        }
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
