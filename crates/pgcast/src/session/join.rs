//! The core's channel membership: joining (token, limits, channel rules, bindings, resume),
//! leaving, token refresh and expiry. Protocol-neutral: a join arrives as a [`JoinRequest`] and
//! ends as [`Joined`] or a [`JoinError`]; the adapter renders either.

use std::sync::Arc;

use axum::extract::ws::Message;
use serde_json::Value;

use super::error::{JoinError, RefreshError, TokenError, TokenSource};
use super::{channel_name, check_topic, subscribe, Core, JoinedChannel};
use crate::audit::{Action, AuditEvent};
use crate::auth::Claims;
use crate::broadcast::{BroadcastResync, Member};
use crate::log::{Position, ResyncReason};
use crate::rooms::TableBinding;
use crate::router::policy::ChannelAccess;

/// What a client asked to join, as its adapter read it. A field the adapter could not read is
/// kept as its error and raised when the core reaches that check, so refusals come in the same
/// order, with the same audit records, whatever the protocol.
pub struct JoinRequest<'a> {
    pub topic: &'a str,
    /// The protocol's reference for the membership (Phoenix: `join_ref`).
    pub join_ref: Option<&'a str>,
    /// A token for this join; without one the connection's `apikey` decides.
    pub access_token: Option<&'a str>,
    /// `postgres_changes` bindings (`{event, schema, table, filter}`).
    pub bindings: Result<Vec<Value>, JoinError>,
    /// Table changes by `[[socketio.tables]]` routes (a Socket.IO room or subscription).
    pub tables: Vec<TableBinding>,
    pub rules: Rules,
    /// Where a returning client left off: `(epoch, position)`.
    pub resume: Result<Option<(String, Position)>, JoinError>,
    /// The last broadcast a returning client received: `(seq, epoch)`.
    pub broadcast_resume: Result<Option<(u64, String)>, JoinError>,
    /// Receive one's own broadcasts.
    pub receive_own: bool,
    /// Acknowledge each broadcast sent.
    pub ack: bool,
    pub presence_enabled: bool,
    pub presence_key: Option<&'a str>,
}

/// Which rules decide who may join a channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rules {
    /// Open to any valid token, unless the policy file closes public channels.
    Public,
    /// The policy file's channel rules.
    Private,
    /// A server-side subscription (a Socket.IO subscribe event): no channel rule applies and
    /// nothing can be sent to it; the row policy decides every row it receives.
    RowsOnly,
}

impl Rules {
    fn access(self, policy: &crate::router::policy::Policy, name: &str, claims: &Claims) -> ChannelAccess {
        match self {
            Rules::Public => policy.channel_access(name, false, claims),
            Rules::Private => policy.channel_access(name, true, claims),
            Rules::RowsOnly => ChannelAccess { read: true, write: false },
        }
    }
}

/// A join the core accepted: the channel is live (subscriptions indexed, hub member), and this
/// is what the adapter tells the client, in order.
pub struct Joined {
    /// The bindings echoed with their server ids.
    pub bindings: Vec<Value>,
    /// Whether the channel receives changes (it has bindings).
    pub has_changes: bool,
    /// Everything after this position reaches the channel (replayed or live), in this epoch.
    pub head: Position,
    pub epoch: String,
    /// For a resuming join: the changes it missed, encoded for its wire, or why it must resync.
    pub replay: Option<Result<Vec<Message>, ResyncReason>>,
    /// For a join resuming broadcasts: those it missed, or why it must resync.
    pub broadcast_replay: Option<Result<Vec<Message>, BroadcastResync>>,
    pub presence_enabled: bool,
}

impl Core {
    /// Resolves the token for a join: the join's `access_token`, else the connection's `apikey`.
    pub fn verify_token(&self, access_token: Option<&str>) -> Result<Claims, TokenError> {
        let (token, source) = match (access_token, self.apikey.as_deref()) {
            (Some(token), _) => (token, TokenSource::AccessToken),
            (None, Some(apikey)) => (apikey, TokenSource::ApiKey),
            (None, None) => return Err(TokenError::Missing),
        };
        self.state.verifier.verify(token).map_err(|error| TokenError::Invalid { token: source, error })
    }

    /// Joins a channel. Joining a topic again replaces the previous membership, as in Phoenix.
    pub async fn join(&mut self, request: JoinRequest<'_>) -> Result<Joined, JoinError> {
        let topic_text = request.topic;
        // Before anything about the join is logged or audited: the topic is the client's text.
        if let Err(reason) = check_topic(topic_text) {
            metrics::counter!("pgcast_joins_refused_total", "protocol" => self.handle.wire.protocol())
                .increment(1);
            // Audited as a bounded prefix (`AuditEvent::channel`), like every client field.
            self.audit(AuditEvent::new(Action::JoinRefused).channel(topic_text).detail(reason.clone()));
            self.strike();
            return Err(JoinError::InvalidTopic(reason));
        }
        if self.channels.contains_key(topic_text) {
            self.leave(topic_text);
        }
        let claims = match self.verify_token(request.access_token) {
            Ok(claims) => {
                // A verified token: the connection is no longer unauthenticated.
                self.unauthenticated = None;
                claims
            }
            Err(error) => {
                metrics::counter!("pgcast_auth_failures_total", "protocol" => self.handle.wire.protocol())
                    .increment(1);
                let reason = error.to_string();
                self.audit(AuditEvent::new(Action::AuthFailure).channel(topic_text).detail(reason));
                return Err(error.into());
            }
        };
        let config = &self.state.config;
        if self.channels.len() >= config.max_channels_per_connection {
            let error = JoinError::TooManyChannels(config.max_channels_per_connection);
            return Err(self.refused(topic_text, &claims, error));
        }
        if !self.count_user(&claims) {
            let error = JoinError::TooManyConnections(self.state.config.max_connections_per_user);
            return Err(self.refused(topic_text, &claims, error));
        }
        let bindings = match request.bindings {
            Ok(bindings) => bindings,
            Err(error) => return Err(self.refused(topic_text, &claims, error)),
        };
        let rules = request.rules;
        let name = channel_name(topic_text);
        let access = rules.access(&self.state.policy, name, &claims);
        if !access.read && !access.write {
            // Not counted or audited as a refused join: the channel's rules say no to everyone
            // of this role, which is configuration, not an attempt.
            return Err(if rules == Rules::Private {
                JoinError::PrivateChannelDenied { role: claims.role.clone(), channel: name.to_string() }
            } else {
                JoinError::PublicChannelsDisabled
            });
        }
        let tables = request.tables;
        let receives_changes = !bindings.is_empty() || !tables.is_empty();
        if receives_changes && !access.read {
            let error = JoinError::MayNotRead { role: claims.role.clone(), channel: name.to_string() };
            return Err(self.refused(topic_text, &claims, error));
        }
        let topic: Arc<str> = Arc::from(topic_text);
        let resume = match request.resume {
            Ok(resume) => resume,
            Err(error) => return Err(self.refused(topic_text, &claims, error)),
        };
        // A resuming subscription never receives a change at or before its position live
        // (a restarted server streams the last changes again).
        let floor = resume.as_ref().map(|(_, position)| *position);
        let (mut subscriptions, response) =
            match subscribe::subscribe(&self.state, &self.handle, &topic, &bindings, &claims, floor).await {
                Ok(result) => result,
                Err(reason) => return Err(self.refused(topic_text, &claims, JoinError::Binding(reason))),
            };
        match subscribe::subscribe_tables(&self.state, &self.handle, &topic, &tables, &claims, floor).await {
            Ok(more) => subscriptions.extend(more),
            Err(reason) => return Err(self.refused(topic_text, &claims, JoinError::Binding(reason))),
        }
        // Snapshot the history and go live under the history lock: the router appends and
        // routes under it too, so every change is either in the snapshot or delivered live.
        let history = self.state.history.lock().await;
        // Where this subscription starts: everything after `head` reaches it (replayed or live),
        // so a client that receives nothing before its next reconnect can resume from here.
        let head = history.head();
        let epoch = history.epoch().to_string();
        let missed = resume.as_ref().map(|(given, position)| history.since(given, *position));
        self.state.index_insert(&subscriptions);
        drop(history);
        let member =
            Member { session: self.handle.clone(), can_read: access.read, receive_own: request.receive_own };
        let broadcast_replay = match request.broadcast_resume {
            Ok(Some((seq, epoch))) => Some(self.state.hub.join_resuming(&topic, member, seq, &epoch)),
            Ok(None) => {
                self.state.hub.join(&topic, member);
                None
            }
            Err(error) => {
                self.state.index_remove(&subscriptions);
                return Err(self.refused(topic_text, &claims, error));
            }
        };
        let expires_at = claims.expires_at();
        tracing::info!(
            session = self.handle.id,
            topic = %topic_text,
            role = %claims.role,
            user = claims.sub.as_deref().unwrap_or(""),
            bindings = subscriptions.len(),
            "joined"
        );
        let identity = claims.identity();
        self.audit(AuditEvent::new(Action::Join).identity(Some(&identity)).channel(topic_text));
        let has_changes = !subscriptions.is_empty();
        // Routed before the channel holds them: the replay sees exactly this join's bindings.
        let replay = match missed {
            None => None,
            Some(Err(reason)) => {
                metrics::counter!("pgcast_resyncs_total").increment(1);
                Some(Err(reason))
            }
            Some(Ok(entries)) => {
                let rls = self.state.rls.as_deref();
                let messages = crate::router::replay(&subscriptions, &entries, &epoch, rls).await;
                metrics::counter!("pgcast_replayed_total").increment(messages.len() as u64);
                Some(Ok(messages))
            }
        };
        self.channels.insert(
            topic_text.to_string(),
            Box::new(JoinedChannel {
                join_ref: request.join_ref.map(Box::from),
                bindings: (!bindings.is_empty()).then(|| Value::from(bindings).to_string().into_boxed_str()),
                tables: tables.into_boxed_slice(),
                subscriptions,
                identity,
                expires_at,
                rules,
                access,
                ack: request.ack,
                presence_key: request.presence_key.filter(|key| !key.is_empty()).map(Box::from),
                presence_synced: false,
            }),
        );
        metrics::gauge!("pgcast_channels").increment(1.0);
        if self.state.config.panic_on_join_topic.as_deref() == Some(topic_text) {
            // Fault injection for tests/session_panics.rs: a panic once the join holds
            // everything a join takes (subscriptions, hub membership, the user's slot).
            panic!("fault injection: panic_on_join_topic {topic_text:?}");
        }
        Ok(Joined {
            bindings: response,
            has_changes,
            head,
            epoch,
            replay,
            broadcast_replay,
            presence_enabled: request.presence_enabled,
        })
    }

    /// Counts the connection against its user's `max_connections_per_user` (once); `false`
    /// when the user has as many as allowed.
    fn count_user(&mut self, claims: &Claims) -> bool {
        if let (None, Some(user)) = (&self.counted_user, &claims.sub) {
            if !self.state.user_connected(user) {
                return false;
            }
            self.counted_user = Some(user.clone());
        }
        true
    }

    /// A token verified for the connection itself (Socket.IO's CONNECT): it is no longer
    /// unauthenticated, and counts against its user.
    pub fn authenticated(&mut self, claims: &Claims) -> Result<(), JoinError> {
        self.unauthenticated = None;
        if !self.count_user(claims) {
            return Err(JoinError::TooManyConnections(self.state.config.max_connections_per_user));
        }
        self.audit(AuditEvent::new(Action::Connect).claims(Some(claims)));
        Ok(())
    }

    /// Counts and audits a refused join (with the claims it was decided on).
    fn refused(&self, topic: &str, claims: &Claims, error: JoinError) -> JoinError {
        metrics::counter!("pgcast_joins_refused_total", "protocol" => self.handle.wire.protocol())
            .increment(1);
        self.audit(
            AuditEvent::new(Action::JoinRefused)
                .claims(Some(claims))
                .channel(topic)
                .detail(error.to_string()),
        );
        error
    }

    /// Leaves `topic`: its subscriptions, hub membership and presence go. Returns the
    /// membership it had, if it was joined.
    pub fn leave(&mut self, topic: &str) -> Option<Box<JoinedChannel>> {
        let channel = self.channels.remove(topic)?;
        self.audit(AuditEvent::new(Action::Leave).identity(Some(&channel.identity)).channel(topic));
        self.state.index_remove(&channel.subscriptions);
        self.state.hub.leave(topic, self.handle.id);
        if let Some(diff) = self.state.presence.untrack(topic, self.handle.id) {
            self.state.deliver_presence_diff(topic, &diff);
        }
        metrics::gauge!("pgcast_channels").decrement(1.0);
        tracing::info!(session = self.handle.id, topic, "left");
        Some(channel)
    }

    pub(super) fn leave_all(&mut self) {
        let topics: Vec<String> = self.channels.keys().cloned().collect();
        for topic in topics {
            self.leave(&topic);
        }
    }

    /// A new token for a joined channel: it continues under the new claims. Its subscriptions
    /// are bound again, so a changed `sub`, role or tenant takes effect at once. On an error
    /// the adapter closes the channel with it as the reason.
    pub async fn refresh(&mut self, topic_text: &str, token: &str) -> Result<(), RefreshError> {
        let claims = match self.state.verifier.verify(token) {
            Ok(claims) => claims,
            Err(error) => {
                metrics::counter!("pgcast_auth_failures_total", "protocol" => self.handle.wire.protocol())
                    .increment(1);
                let error = TokenError::Invalid { token: TokenSource::AccessToken, error };
                let reason = error.to_string();
                self.audit(AuditEvent::new(Action::AuthFailure).channel(topic_text).detail(reason));
                return Err(error.into());
            }
        };
        self.refresh_as(topic_text, &claims).await
    }

    /// [`Core::refresh`] with claims already verified (one token for several channels).
    pub async fn refresh_as(&mut self, topic_text: &str, claims: &Claims) -> Result<(), RefreshError> {
        let Some(channel) = self.channels.get(topic_text) else { return Ok(()) };
        let name = channel_name(topic_text);
        let access = channel.rules.access(&self.state.policy, name, claims);
        if !access.admits(channel.bindings.is_some() || !channel.tables.is_empty()) {
            return Err(RefreshError::MayNotStay { role: claims.role.clone(), channel: name.to_string() });
        }
        let topic: Arc<str> = Arc::from(topic_text);
        // Written by `join` from parsed JSON: failing to read it back is a bug, said as one
        // rather than re-binding nothing.
        let bindings: Vec<Value> = match channel.bindings.as_deref().map(serde_json::from_str).transpose() {
            Ok(bindings) => bindings.unwrap_or_default(),
            Err(e) => return Err(RefreshError::Binding(format!("internal error: bindings unreadable: {e}"))),
        };
        let mut subscriptions =
            match subscribe::subscribe(&self.state, &self.handle, &topic, &bindings, claims, None).await {
                Ok((subscriptions, _)) => subscriptions,
                Err(reason) => return Err(RefreshError::Binding(reason)),
            };
        match subscribe::subscribe_tables(&self.state, &self.handle, &topic, &channel.tables, claims, None)
            .await
        {
            Ok(more) => subscriptions.extend(more),
            Err(reason) => return Err(RefreshError::Binding(reason)),
        }
        let Some(channel) = self.channels.get_mut(topic_text) else { return Ok(()) };
        self.state.index_remove(&channel.subscriptions);
        self.state.index_insert(&subscriptions);
        channel.subscriptions = subscriptions;
        channel.expires_at = claims.expires_at();
        channel.identity = claims.identity();
        channel.access = access;
        let receive_own = self.state.hub.receives_own(topic_text, self.handle.id);
        self.state
            .hub
            .join(&topic, Member { session: self.handle.clone(), can_read: access.read, receive_own });
        self.audit(AuditEvent::new(Action::TokenRefresh).claims(Some(claims)).channel(topic_text));
        Ok(())
    }

    /// Channels whose token has expired, with the reason to close each with.
    pub(super) fn expired(&self) -> Vec<(String, String)> {
        let now = tokio::time::Instant::now();
        let seconds = crate::auth::now_secs();
        self.channels
            .iter()
            .filter(|(_, c)| c.expires_at <= now)
            .map(|(topic, c)| {
                let ago = seconds.saturating_sub(c.identity.exp);
                (topic.clone(), format!("Token has expired {ago} seconds ago"))
            })
            .collect()
    }
}
