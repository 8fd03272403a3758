//! The core's client-to-channel messages: `broadcast` and `presence` (`track` / `untrack`), each
//! checked against the channel's write right before anything is delivered.

use serde_json::{Map, Value};

use super::error::SendError;
use super::{channel_name, Core};
use crate::audit::{Action, AuditEvent};
use crate::protocol::BroadcastPayload;

impl Core {
    /// Broadcasts `event` to the channel's other members (and this one, if it asked for its
    /// own). Returns whether the channel wants the broadcast acknowledged.
    pub fn broadcast(&self, topic: &str, event: &str, payload: &BroadcastPayload) -> Result<bool, SendError> {
        let channel = self.channels.get(topic).ok_or(SendError::NotJoined)?;
        if !channel.access.write {
            return Err(SendError::MayNotSend(channel_name(topic).to_string()));
        }
        self.state.hub.broadcast(topic, Some(self.handle.id), event, payload);
        Ok(channel.ack)
    }

    /// Checks that this connection may track presence on `topic`; returns its presence key
    /// (made now if the join gave none).
    pub fn presence_key(&mut self, topic: &str) -> Result<String, SendError> {
        let channel = self.channels.get_mut(topic).ok_or(SendError::NotJoined)?;
        if !channel.access.write {
            return Err(SendError::MayNotTrack(channel_name(topic).to_string()));
        }
        Ok(channel.presence_key.get_or_insert_with(|| crate::random::hex_id().into()).to_string())
    }

    /// The presence state to send, once per join and only to a member that may read the
    /// channel: the client applies diffs only after a state. With the join's reference.
    pub fn presence_state_due(&mut self, topic: &str) -> Option<(Option<Box<str>>, Value)> {
        let channel = self.channels.get_mut(topic)?;
        if channel.presence_synced || !channel.access.read {
            return None;
        }
        channel.presence_synced = true;
        Some((channel.join_ref.clone(), self.state.presence.state(topic)))
    }

    /// Tracks this connection on `topic` under `key` (after [`Core::presence_key`] and the
    /// state was sent): every member gets the diff.
    pub fn track(&mut self, topic: &str, key: &str, meta: Map<String, Value>) {
        let diff = self.state.presence.track(topic, self.handle.id, key, meta);
        self.state.deliver_presence_diff(topic, &diff);
        let identity = self.channels.get(topic).map(|c| c.identity.clone());
        self.audit(AuditEvent::new(Action::PresenceTrack).identity(identity.as_ref()).channel(topic));
    }

    pub fn untrack(&mut self, topic: &str) {
        if let Some(diff) = self.state.presence.untrack(topic, self.handle.id) {
            self.state.deliver_presence_diff(topic, &diff);
        }
    }
}
