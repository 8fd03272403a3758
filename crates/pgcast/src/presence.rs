//! Presence (Phoenix Presence as Supabase Realtime serves it): who is tracked on each topic,
//! under which key, with what metadata.
//!
//! `track` and `untrack` return the `presence_diff` to send; the caller delivers it to the
//! topic's readers. State is one node's memory; a member whose connection ends leaves presence
//! when its session ends (at the latest after the heartbeat timeout).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use serde_json::{json, Map, Value};

#[derive(Debug, Clone)]
struct Meta {
    session: u64,
    phx_ref: String,
    meta: Map<String, Value>,
}

impl Meta {
    fn to_json(&self) -> Value {
        let mut meta = self.meta.clone();
        meta.insert("phx_ref".into(), Value::String(self.phx_ref.clone()));
        Value::Object(meta)
    }
}

/// topic -> key -> metas.
#[derive(Default)]
pub struct Presence {
    topics: Mutex<HashMap<String, HashMap<String, Vec<Meta>>>>,
    next_ref: AtomicU64,
}

/// `{joins: {key: {metas}}, leaves: {key: {metas}}}`.
pub type Diff = Value;

fn keyed(key: &str, metas: &[Meta]) -> Value {
    let metas: Vec<Value> = metas.iter().map(Meta::to_json).collect();
    json!({ key: { "metas": metas } })
}

impl Presence {
    /// The `presence_state` payload for a topic: `{key: {metas: [...]}}`.
    pub fn state(&self, topic: &str) -> Value {
        let topics = self.topics.lock().unwrap_or_else(|p| p.into_inner());
        let mut state = Map::new();
        if let Some(keys) = topics.get(topic) {
            for (key, metas) in keys {
                let metas: Vec<Value> = metas.iter().map(Meta::to_json).collect();
                state.insert(key.clone(), json!({ "metas": metas }));
            }
        }
        Value::Object(state)
    }

    /// Tracks `session` under `key` with `meta`, replacing what it tracked before on the topic.
    pub fn track(&self, topic: &str, session: u64, key: &str, meta: Map<String, Value>) -> Diff {
        let phx_ref = format!("F{:x}", self.next_ref.fetch_add(1, Ordering::Relaxed));
        let leaves = self.remove(topic, session);
        let entry = Meta { session, phx_ref, meta };
        let joins = keyed(key, std::slice::from_ref(&entry));
        let mut topics = self.topics.lock().unwrap_or_else(|p| p.into_inner());
        topics.entry(topic.to_string()).or_default().entry(key.to_string()).or_default().push(entry);
        json!({ "joins": joins, "leaves": leaves })
    }

    /// Stops tracking `session` on `topic`; `None` if it was not tracked.
    pub fn untrack(&self, topic: &str, session: u64) -> Option<Diff> {
        let leaves = self.remove(topic, session);
        if leaves.as_object().is_none_or(Map::is_empty) {
            return None;
        }
        Some(json!({ "joins": {}, "leaves": leaves }))
    }

    /// Removes the session's metas from the topic and returns them keyed, as `leaves`.
    fn remove(&self, topic: &str, session: u64) -> Value {
        let mut topics = self.topics.lock().unwrap_or_else(|p| p.into_inner());
        let mut leaves = Map::new();
        let Some(keys) = topics.get_mut(topic) else { return Value::Object(leaves) };
        keys.retain(|key, metas| {
            let (gone, kept): (Vec<Meta>, Vec<Meta>) = metas.drain(..).partition(|m| m.session == session);
            if !gone.is_empty() {
                let gone: Vec<Value> = gone.iter().map(Meta::to_json).collect();
                leaves.insert(key.clone(), json!({ "metas": gone }));
            }
            *metas = kept;
            !metas.is_empty()
        });
        if keys.is_empty() {
            topics.remove(topic);
        }
        Value::Object(leaves)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn track_replaces_and_untrack_leaves() {
        let presence = Presence::default();
        let diff = presence.track("t", 1, "alice", meta(json!({"status": "online"})));
        assert_eq!(diff["joins"]["alice"]["metas"][0]["status"], "online");
        assert_eq!(diff["leaves"], json!({}));
        let first_ref = diff["joins"]["alice"]["metas"][0]["phx_ref"].clone();

        let diff = presence.track("t", 1, "alice", meta(json!({"status": "away"})));
        assert_eq!(diff["leaves"]["alice"]["metas"][0]["phx_ref"], first_ref, "the old meta leaves");
        presence.track("t", 2, "alice", meta(json!({"status": "phone"})));
        let state = presence.state("t");
        assert_eq!(state["alice"]["metas"].as_array().unwrap().len(), 2, "two devices under one key");

        let diff = presence.untrack("t", 1).unwrap();
        assert_eq!(diff["leaves"]["alice"]["metas"][0]["status"], "away");
        assert!(presence.untrack("t", 1).is_none());
        presence.untrack("t", 2);
        assert_eq!(presence.state("t"), json!({}));
    }
}
