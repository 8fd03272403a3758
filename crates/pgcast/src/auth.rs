//! JWT verification (HS256, the shared secret Supabase projects use) and the claims pgcast reads.
//!
//! A token is verified once per join or `access_token` refresh, never per message. Errors say
//! what is wrong with the token without echoing it; tokens are never logged.
//! Authorization (who may subscribe to what) is not decided here.

use std::time::{SystemTime, UNIX_EPOCH};

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde_json::{Map, Value};

/// The role that sees every row (Supabase's `service_role`).
pub const SERVICE_ROLE: &str = "service_role";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("no token: pass it as the apikey query parameter or the join's access_token")]
    Missing,
    #[error("token is malformed (not a JWT)")]
    Malformed,
    #[error("token signature is invalid")]
    BadSignature,
    #[error("token has expired")]
    Expired,
    #[error("token is not valid yet (nbf)")]
    NotYetValid,
    #[error("token must be signed with HS256")]
    WrongAlgorithm,
    #[error("token is missing the {0} claim")]
    MissingClaim(String),
    #[error("token is invalid: {0}")]
    Invalid(String),
}

/// Verified claims of one token.
#[derive(Debug, Clone)]
pub struct Claims {
    /// `role`, `anon` when absent.
    pub role: String,
    /// `sub`, the user id, when present.
    pub sub: Option<String>,
    /// Expiry, seconds since the Unix epoch.
    pub exp: u64,
    /// Every claim, for policies that name others.
    pub all: Map<String, Value>,
}

impl Claims {
    /// Seconds until expiry (0 if already expired).
    pub fn seconds_left(&self) -> u64 {
        self.exp.saturating_sub(now_secs())
    }

    /// What outlives the join: who the token is for and until when.
    pub fn identity(&self) -> Identity {
        Identity {
            role: self.role.as_str().into(),
            sub: self.sub.as_deref().map(Into::into),
            tenant: self.all.get("tenant_id").map(|t| match t {
                Value::String(s) => s.as_str().into(),
                other => other.to_string().into(),
            }),
            exp: self.exp,
        }
    }
}

/// The part of a token a joined channel keeps, for audit records, log lines and its expiry.
/// Every claim (`Claims::all`) is needed only while a join or token refresh is decided; a
/// channel stays joined for hours on every connection, so it keeps this compact copy instead.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub role: Box<str>,
    pub sub: Option<Box<str>>,
    /// The `tenant_id` claim, as text.
    pub tenant: Option<Box<str>>,
    /// Expiry, seconds since the Unix epoch.
    pub exp: u64,
}

/// Verifies tokens against one secret.
pub struct Verifier {
    key: DecodingKey,
    validation: Validation,
}

impl Verifier {
    pub fn new(secret: &str) -> Verifier {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = 0;
        // Supabase tokens carry `aud: authenticated`; audience is not pgcast's to check.
        validation.validate_aud = false;
        validation.set_required_spec_claims(&["exp"]);
        Verifier { key: DecodingKey::from_secret(secret.as_bytes()), validation }
    }

    pub fn verify(&self, token: &str) -> Result<Claims, AuthError> {
        if token.is_empty() {
            return Err(AuthError::Missing);
        }
        let data =
            jsonwebtoken::decode::<Map<String, Value>>(token, &self.key, &self.validation).map_err(|e| {
                match e.kind() {
                    ErrorKind::InvalidToken
                    | ErrorKind::Base64(_)
                    | ErrorKind::Json(_)
                    | ErrorKind::Utf8(_) => AuthError::Malformed,
                    ErrorKind::InvalidSignature => AuthError::BadSignature,
                    ErrorKind::ExpiredSignature => AuthError::Expired,
                    ErrorKind::ImmatureSignature => AuthError::NotYetValid,
                    ErrorKind::InvalidAlgorithm
                    | ErrorKind::InvalidAlgorithmName
                    | ErrorKind::MissingAlgorithm => AuthError::WrongAlgorithm,
                    ErrorKind::MissingRequiredClaim(claim) => AuthError::MissingClaim(claim.clone()),
                    other => AuthError::Invalid(format!("{other:?}")),
                }
            })?;
        let all = data.claims;
        let exp = all.get("exp").and_then(Value::as_u64).ok_or(AuthError::MissingClaim("exp".into()))?;
        let role = all.get("role").and_then(Value::as_str).unwrap_or("anon").to_string();
        let sub = all.get("sub").and_then(|v| match v {
            Value::String(s) => Some(s.clone()),
            Value::Number(n) => Some(n.to_string()),
            _ => None,
        });
        Ok(Claims { role, sub, exp, all })
    }
}

/// Signs claims with HS256; used by `pgcast demo` and `pgcast token` to mint tokens.
pub fn sign(secret: &str, claims: &Value) -> Result<String, AuthError> {
    jsonwebtoken::encode(&Header::new(Algorithm::HS256), claims, &EncodingKey::from_secret(secret.as_bytes()))
        .map_err(|e| AuthError::Invalid(e.to_string()))
}

pub fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const SECRET: &str = "a-test-secret-of-enough-length";

    #[test]
    fn valid_token_yields_role_sub_and_exp() {
        let token = sign(SECRET, &json!({"role": "service_role", "sub": 7, "exp": now_secs() + 60})).unwrap();
        let claims = Verifier::new(SECRET).verify(&token).unwrap();
        assert_eq!(claims.role, "service_role");
        assert_eq!(claims.sub.as_deref(), Some("7"));
        assert!(claims.seconds_left() > 50);
    }

    #[test]
    fn identity_keeps_who_and_until_when() {
        let exp = now_secs() + 60;
        let token =
            sign(SECRET, &json!({"role": "authenticated", "sub": "u1", "tenant_id": 4, "exp": exp})).unwrap();
        let identity = Verifier::new(SECRET).verify(&token).unwrap().identity();
        assert_eq!(&*identity.role, "authenticated");
        assert_eq!(identity.sub.as_deref(), Some("u1"));
        assert_eq!(identity.tenant.as_deref(), Some("4"));
        assert_eq!(identity.exp, exp);
    }

    #[test]
    fn each_bad_token_gets_its_own_reason() {
        let verifier = Verifier::new(SECRET);
        let expired = sign(SECRET, &json!({"role": "x", "exp": now_secs() - 5})).unwrap();
        assert_eq!(verifier.verify(&expired).unwrap_err(), AuthError::Expired);
        let other_secret = sign("another-secret-of-enough-len", &json!({"exp": now_secs() + 60})).unwrap();
        assert_eq!(verifier.verify(&other_secret).unwrap_err(), AuthError::BadSignature);
        assert_eq!(verifier.verify("not.a.jwt").unwrap_err(), AuthError::Malformed);
        assert_eq!(verifier.verify("").unwrap_err(), AuthError::Missing);
        let no_exp = sign(SECRET, &json!({"role": "x"})).unwrap();
        assert_eq!(verifier.verify(&no_exp).unwrap_err(), AuthError::MissingClaim("exp".into()));
    }
}
