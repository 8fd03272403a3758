//! JWT verification (HS256, the shared secret Supabase projects use) and the claims pgcast reads.
//!
//! A token is verified once per join or `access_token` refresh, never per message. Errors say
//! what is wrong with the token without echoing it; tokens are never logged.
//! Authorization (who may subscribe to what) is not decided here.

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
    #[error("token claim {0} must be a number of seconds since 1970")]
    NotANumericDate(&'static str),
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

    /// When the token expires, as a timer deadline. `exp` is the client's number: one far in
    /// the future (`u64::MAX`) would overflow `Instant`, so the deadline saturates at a century
    /// from now, a time no connection lives to.
    pub fn expires_at(&self) -> tokio::time::Instant {
        const CENTURY: u64 = 100 * 365 * 24 * 3600;
        let now = tokio::time::Instant::now();
        now + std::time::Duration::from_secs(self.seconds_left().min(CENTURY))
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
    /// Seconds a token's `nbf` may lie in the future (clocks of the issuer and pgcast differ).
    nbf_leeway: u64,
}

impl Verifier {
    pub fn new(secret: &str, nbf_leeway_secs: u64) -> Verifier {
        let mut validation = Validation::new(Algorithm::HS256);
        // `exp` and `nbf` are checked below, not by jsonwebtoken: its checks need whole numbers
        // (a fractional NumericDate, which RFC 7519 allows, would read as a missing claim) and
        // apply one leeway to both, while `exp` is checked exactly, as Supabase does.
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.set_required_spec_claims::<&str>(&[]);
        // Supabase tokens carry `aud: authenticated`; audience is not pgcast's to check.
        validation.validate_aud = false;
        Verifier { key: DecodingKey::from_secret(secret.as_bytes()), validation, nbf_leeway: nbf_leeway_secs }
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
        let now = now_secs();
        let exp = numeric_date(&all, "exp")?.ok_or(AuthError::MissingClaim("exp".into()))?;
        // RFC 7519 4.1.4: not accepted on or after `exp`.
        if exp <= now {
            return Err(AuthError::Expired);
        }
        if let Some(nbf) = numeric_date(&all, "nbf")? {
            if nbf > now.saturating_add(self.nbf_leeway) {
                return Err(AuthError::NotYetValid);
            }
        }
        let role = all.get("role").and_then(Value::as_str).unwrap_or("anon").to_string();
        let sub = all.get("sub").and_then(|v| match v {
            Value::String(s) => Some(s.clone()),
            Value::Number(n) => Some(n.to_string()),
            _ => None,
        });
        Ok(Claims { role, sub, exp, all })
    }
}

/// A NumericDate claim (RFC 7519 2: seconds since 1970, fractions allowed) as whole seconds,
/// saturating: `exp: 1e300` is "never" and a negative one is long past, neither an overflow.
fn numeric_date(claims: &Map<String, Value>, name: &'static str) -> Result<Option<u64>, AuthError> {
    match claims.get(name) {
        None => Ok(None),
        Some(Value::Number(n)) => match (n.as_u64(), n.as_f64()) {
            (Some(whole), _) => Ok(Some(whole)),
            // `as` saturates: negative and fractional values round down into 0..=u64::MAX.
            (None, Some(float)) => Ok(Some(float.max(0.0) as u64)),
            (None, None) => Err(AuthError::NotANumericDate(name)),
        },
        Some(_) => Err(AuthError::NotANumericDate(name)),
    }
}

/// Signs claims with HS256; used by `pgcast demo` and `pgcast token` to mint tokens.
pub fn sign(secret: &str, claims: &Value) -> Result<String, AuthError> {
    jsonwebtoken::encode(&Header::new(Algorithm::HS256), claims, &EncodingKey::from_secret(secret.as_bytes()))
        .map_err(|e| AuthError::Invalid(e.to_string()))
}

/// The clock token times are read against (`clock::now_secs`), where callers of `auth` expect it.
pub use crate::clock::now_secs;

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const SECRET: &str = "a-test-secret-of-enough-length";

    #[test]
    fn valid_token_yields_role_sub_and_exp() {
        let token = sign(SECRET, &json!({"role": "service_role", "sub": 7, "exp": now_secs() + 60})).unwrap();
        let claims = Verifier::new(SECRET, 0).verify(&token).unwrap();
        assert_eq!(claims.role, "service_role");
        assert_eq!(claims.sub.as_deref(), Some("7"));
        assert!(claims.seconds_left() > 50);
    }

    #[test]
    fn identity_keeps_who_and_until_when() {
        let exp = now_secs() + 60;
        let token =
            sign(SECRET, &json!({"role": "authenticated", "sub": "u1", "tenant_id": 4, "exp": exp})).unwrap();
        let identity = Verifier::new(SECRET, 0).verify(&token).unwrap().identity();
        assert_eq!(&*identity.role, "authenticated");
        assert_eq!(identity.sub.as_deref(), Some("u1"));
        assert_eq!(identity.tenant.as_deref(), Some("4"));
        assert_eq!(identity.exp, exp);
    }

    #[test]
    fn each_bad_token_gets_its_own_reason() {
        let verifier = Verifier::new(SECRET, 0);
        let expired = sign(SECRET, &json!({"role": "x", "exp": now_secs() - 5})).unwrap();
        assert_eq!(verifier.verify(&expired).unwrap_err(), AuthError::Expired);
        let other_secret = sign("another-secret-of-enough-len", &json!({"exp": now_secs() + 60})).unwrap();
        assert_eq!(verifier.verify(&other_secret).unwrap_err(), AuthError::BadSignature);
        assert_eq!(verifier.verify("not.a.jwt").unwrap_err(), AuthError::Malformed);
        assert_eq!(verifier.verify("").unwrap_err(), AuthError::Missing);
        let no_exp = sign(SECRET, &json!({"role": "x"})).unwrap();
        assert_eq!(verifier.verify(&no_exp).unwrap_err(), AuthError::MissingClaim("exp".into()));
        let text_exp = sign(SECRET, &json!({"role": "x", "exp": "tomorrow"})).unwrap();
        assert_eq!(verifier.verify(&text_exp).unwrap_err(), AuthError::NotANumericDate("exp"));
        let now_exp = sign(SECRET, &json!({"role": "x", "exp": now_secs()})).unwrap();
        assert_eq!(verifier.verify(&now_exp).unwrap_err(), AuthError::Expired, "not accepted on exp");
        let hs512 = jsonwebtoken::encode(
            &Header::new(Algorithm::HS512),
            &json!({"exp": now_secs() + 60}),
            &EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .unwrap();
        assert_eq!(verifier.verify(&hs512).unwrap_err(), AuthError::WrongAlgorithm);
    }

    #[test]
    fn nbf_in_the_future_is_refused_beyond_the_leeway() {
        let verifier = Verifier::new(SECRET, 5);
        let later = sign(SECRET, &json!({"exp": now_secs() + 600, "nbf": now_secs() + 60})).unwrap();
        assert_eq!(verifier.verify(&later).unwrap_err(), AuthError::NotYetValid);
        let within = sign(SECRET, &json!({"exp": now_secs() + 600, "nbf": now_secs() + 3})).unwrap();
        assert!(verifier.verify(&within).is_ok(), "a skew inside the leeway is accepted");
        let past = sign(SECRET, &json!({"exp": now_secs() + 600, "nbf": now_secs() - 60})).unwrap();
        assert!(verifier.verify(&past).is_ok());
        let text = sign(SECRET, &json!({"exp": now_secs() + 600, "nbf": "soon"})).unwrap();
        assert_eq!(verifier.verify(&text).unwrap_err(), AuthError::NotANumericDate("nbf"));
    }

    #[test]
    fn extreme_and_fractional_numeric_dates_saturate() {
        let verifier = Verifier::new(SECRET, 0);
        for exp in [json!(u64::MAX), json!(1e300), json!(now_secs() as f64 + 60.5)] {
            let token = sign(SECRET, &json!({"exp": exp})).unwrap();
            let claims = verifier.verify(&token).unwrap_or_else(|e| panic!("exp {exp}: {e}"));
            assert!(claims.seconds_left() > 50);
            assert!(claims.expires_at() > tokio::time::Instant::now(), "exp {exp}: a deadline, no overflow");
        }
        let negative = sign(SECRET, &json!({"exp": -5})).unwrap();
        assert_eq!(verifier.verify(&negative).unwrap_err(), AuthError::Expired);
        let huge_nbf = sign(SECRET, &json!({"exp": now_secs() + 60, "nbf": u64::MAX})).unwrap();
        assert_eq!(Verifier::new(SECRET, 5).verify(&huge_nbf).unwrap_err(), AuthError::NotYetValid);
    }
}
