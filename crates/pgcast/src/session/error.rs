//! Why the session core refused what a client asked: typed, with the text a client reads as
//! `Display`. Each protocol adapter renders a refusal its own way (Phoenix: an `error` reply
//! with `{reason}`); the side effects of a refusal (metrics, audit records, strikes) are the
//! core's and have happened by the time an adapter sees one.

use crate::auth::AuthError;

/// Which token a join was decided on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenSource {
    /// The join's own `access_token`.
    AccessToken,
    /// The connection's `apikey`.
    ApiKey,
}

impl TokenSource {
    fn name(self) -> &'static str {
        match self {
            TokenSource::AccessToken => "access_token",
            TokenSource::ApiKey => "apikey",
        }
    }
}

/// A token that could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// No token at all.
    #[error("{}", AuthError::Missing)]
    Missing,
    #[error("invalid {}: {error}", .token.name())]
    Invalid { token: TokenSource, error: AuthError },
}

/// A join the core refused.
#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    /// The topic cannot name a channel (too long, control characters, empty): the client's
    /// text is not repeated beyond a bounded prefix.
    #[error("{0}")]
    InvalidTopic(String),
    #[error(transparent)]
    Token(#[from] TokenError),
    #[error("too many channels: at most {0} per connection")]
    TooManyChannels(usize),
    /// The connection is cut off after this refusal is sent.
    #[error("too many connections for this user: at most {0}")]
    TooManyConnections(usize),
    #[error("config.postgres_changes must be an array")]
    BindingsNotAnArray,
    #[error("role {role:?} is not allowed to join private channel {channel:?}")]
    PrivateChannelDenied { role: String, channel: String },
    #[error("public channels are disabled: join with config.private = true")]
    PublicChannelsDisabled,
    #[error("role {role:?} may not read channel {channel:?}")]
    MayNotRead { role: String, channel: String },
    /// `config.resume` or `config.resume.broadcast` could not be read.
    #[error("{0}")]
    InvalidResume(String),
    /// A `postgres_changes` binding was refused (unknown table, bad filter, not allowed).
    #[error("{0}")]
    Binding(String),
}

impl JoinError {
    /// The close code the connection is cut off with once the refusal is sent, if any.
    pub fn cuts_off(&self) -> Option<u16> {
        match self {
            JoinError::TooManyConnections(_) => Some(crate::outbound::close_code::TOO_MANY_CONNECTIONS),
            _ => None,
        }
    }
}

/// A token refresh the core refused: the channel is closed with this as its reason.
#[derive(Debug, thiserror::Error)]
pub enum RefreshError {
    #[error(transparent)]
    Token(#[from] TokenError),
    #[error("role {role:?} may not stay on channel {channel:?}")]
    MayNotStay { role: String, channel: String },
    /// The channel's bindings were refused under the new claims.
    #[error("{0}")]
    Binding(String),
}

/// A message to a channel (broadcast, presence) the core refused.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("unmatched topic: join the channel first")]
    NotJoined,
    #[error("not allowed to send on channel {0:?}")]
    MayNotSend(String),
    #[error("not allowed to track presence on channel {0:?}")]
    MayNotTrack(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_read_as_before_the_split() {
        let missing = JoinError::from(TokenError::Missing);
        assert_eq!(missing.to_string(), AuthError::Missing.to_string());
        let invalid =
            JoinError::from(TokenError::Invalid { token: TokenSource::ApiKey, error: AuthError::Expired });
        assert_eq!(invalid.to_string(), "invalid apikey: token has expired");
        let invalid = TokenError::Invalid { token: TokenSource::AccessToken, error: AuthError::BadSignature };
        assert_eq!(invalid.to_string(), "invalid access_token: token signature is invalid");
        let denied = JoinError::PrivateChannelDenied { role: "anon".into(), channel: "room".into() };
        assert_eq!(denied.to_string(), r#"role "anon" is not allowed to join private channel "room""#);
        assert_eq!(JoinError::TooManyChannels(3).to_string(), "too many channels: at most 3 per connection");
        assert!(JoinError::TooManyConnections(2).cuts_off().is_some());
        assert!(JoinError::TooManyChannels(2).cuts_off().is_none());
        assert_eq!(SendError::MayNotSend("a".into()).to_string(), r#"not allowed to send on channel "a""#);
    }
}
