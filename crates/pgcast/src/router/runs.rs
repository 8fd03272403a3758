//! A transaction's messages gathered per session before they are queued: each session gets a
//! whole multi-change transaction as one queue entry, and sessions that get the same sequence of
//! messages (table-wide subscribers of one topic) share one copy of it.
//!
//! So a transaction of 50,000 rows is one entry in a table-wide subscriber's bounded queue, not
//! 50,000, and the memory it takes is the transaction's once, not once per subscriber.
//!
//! Sequences are interned as they grow: a node is (previous node, message), and a session's
//! sequence is its last node. Messages serialized once for several recipients share their bytes,
//! so "the same message" is "the same bytes": equal address and length, which is sound while
//! every message of the transaction is held here. It is not a queue and sends nothing itself.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::ws::Message;

use crate::outbound::{Frames, Outbound, SessionHandle};

/// No previous node: the start of a sequence.
const START: u32 = u32::MAX;
/// Room kept between transactions; what a large one needed beyond it is given back.
const KEEP: usize = 256;

#[derive(Default)]
pub struct Runs {
    /// (previous node or `START`, message).
    nodes: Vec<(u32, Message)>,
    /// (previous node, message address, message length) -> node.
    interned: HashMap<(u32, usize, usize), u32>,
    /// Session id -> the session and the last node of its sequence.
    sessions: HashMap<u64, (Arc<SessionHandle>, u32)>,
}

/// The identity of a message's bytes; `None` for frames the router never makes, which are then
/// never shared.
fn identity(message: &Message) -> Option<(usize, usize)> {
    match message {
        Message::Text(text) => Some((text.as_str().as_ptr() as usize, text.len())),
        Message::Binary(bytes) => Some((bytes.as_ptr() as usize, bytes.len())),
        _ => None,
    }
}

impl Runs {
    /// Appends `message` to `session`'s sequence for the current transaction.
    pub fn push(&mut self, session: &Arc<SessionHandle>, message: Message) {
        let (_, last) = self.sessions.entry(session.id).or_insert_with(|| (session.clone(), START));
        let key = identity(&message).map(|(address, len)| (*last, address, len));
        if let Some(node) = key.and_then(|key| self.interned.get(&key)) {
            *last = *node;
            return;
        }
        let node = self.nodes.len() as u32;
        self.nodes.push((*last, message));
        if let Some(key) = key {
            self.interned.insert(key, node);
        }
        *last = node;
    }

    /// Queues each session's sequence as one entry (shared between sessions with the same
    /// sequence) and clears for the next transaction. Returns how many sessions accepted theirs.
    pub fn deliver(&mut self, commit_time_micros: i64) -> usize {
        let mut made: HashMap<u32, Arc<[Message]>> = HashMap::new();
        let mut accepted = 0;
        for (_, (session, last)) in self.sessions.drain() {
            let run = made.entry(last).or_insert_with(|| sequence(&self.nodes, last)).clone();
            if session.deliver(Outbound { frames: Frames::Run(run), commit_time_micros }) {
                accepted += 1;
            }
        }
        self.nodes.clear();
        self.nodes.shrink_to(KEEP);
        self.interned.clear();
        self.interned.shrink_to(KEEP);
        self.sessions.shrink_to(KEEP);
        accepted
    }
}

/// The messages from the start of a sequence to `last`, in order.
fn sequence(nodes: &[(u32, Message)], last: u32) -> Arc<[Message]> {
    let mut messages = Vec::new();
    let mut node = last;
    while let Some((previous, message)) = nodes.get(node as usize) {
        messages.push(message.clone());
        node = *previous;
    }
    messages.reverse();
    messages.into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbound::SessionHandle;

    fn text(s: &str) -> Message {
        Message::Text(s.to_string().into())
    }

    fn texts(frames: &Frames) -> Vec<String> {
        match frames {
            Frames::One(m) => vec![m.to_text().unwrap_or_default().to_string()],
            Frames::Run(run) => run.iter().map(|m| m.to_text().unwrap_or_default().to_string()).collect(),
        }
    }

    #[tokio::test]
    async fn sessions_with_the_same_messages_share_one_run_and_others_keep_their_order() {
        let (a, b, c) =
            (SessionHandle::detached(16), SessionHandle::detached(16), SessionHandle::detached(16));
        let mut runs = Runs::default();
        // Two changes; a and b get the same (shared) message for each, c its own ones, and b
        // also gets an extra message after the first change (a second channel).
        let first = text("first");
        let second = text("second");
        for session in [&a, &b] {
            runs.push(session, first.clone());
        }
        runs.push(&c, text("c1"));
        runs.push(&b, text("b-extra"));
        for session in [&a, &b] {
            runs.push(session, second.clone());
        }
        runs.push(&c, text("c2"));
        assert_eq!(runs.deliver(7), 3);

        let take = |session: &Arc<SessionHandle>| session.take_queued();
        let (qa, qb, qc) = (take(&a), take(&b), take(&c));
        assert_eq!(qa.len(), 1, "one queue entry for the whole transaction");
        assert_eq!(qa[0].commit_time_micros, 7);
        assert_eq!(texts(&qa[0].frames), ["first", "second"]);
        assert_eq!(texts(&qb[0].frames), ["first", "b-extra", "second"]);
        assert_eq!(texts(&qc[0].frames), ["c1", "c2"]);

        // Identical sequences are one allocation.
        let mut runs = Runs::default();
        for session in [&a, &b] {
            runs.push(session, first.clone());
            runs.push(session, second.clone());
        }
        runs.deliver(8);
        let (Frames::Run(ra), Frames::Run(rb)) = (&take(&a)[0].frames, &take(&b)[0].frames) else {
            panic!("runs expected");
        };
        assert!(Arc::ptr_eq(ra, rb));
        // Nothing is kept for the next transaction.
        assert!(runs.nodes.is_empty() && runs.interned.is_empty() && runs.sessions.is_empty());
    }
}
