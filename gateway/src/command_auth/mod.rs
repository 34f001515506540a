//! Authentication of operator-signed command and approval tokens.
//!
//! A command reaches the policy only as a [`VerifiedCommand`], which only
//! [`TokenVerifier::verify`] makes; approvals only as [`VerifiedApproval`]s
//! from [`TokenVerifier::verify_approval`].
//!
//! # Token format
//! A token is a JWT in JWS compact serialization (RFC 7515, RFC 7519):
//! `BASE64URL(header) "." BASE64URL(payload) "." BASE64URL(signature)`,
//! base64url without padding and without whitespace, ASCII only.
//!
//! **Header**: a JSON object with
//! - `alg`: `"EdDSA"` (Ed25519, RFC 8037; 64-byte signature) or `"ES256"`
//!   (ECDSA P-256 with SHA-256; the 64-byte `r || s` form of RFC 7518
//!   §3.4, not DER). It must be the algorithm of the key named by `kid`.
//! - `typ`: exactly `"twin-command+jwt"` for a command, exactly
//!   `"twin-approval+jwt"` for an approval (case-sensitive).
//! - `kid`: the RFC 7638 JWK thumbprint (base64url SHA-256) of the
//!   signer's public key, i.e. of `{"crv":"Ed25519","kty":"OKP","x":…}` or
//!   `{"crv":"P-256","kty":"EC","x":…,"y":…}`.
//! - any other member (`jku`, `x5u`, `jwk`, `x5c`, `cty`, …) is ignored and
//!   never used to find a key; `crit` is refused (no extension is
//!   understood). A member may appear only once among `alg`, `typ`, `kid`.
//!
//! The signature covers the ASCII bytes `BASE64URL(header) "."
//! BASE64URL(payload)` as received: nothing is re-serialized.
//!
//! **Command claims** (`twin_model::command::CommandClaims`), a JSON
//! object with exactly these members, no others, each once:
//! ```json
//! {"iss":"ops-idp","sub":"alice","aud":"gw-plant-1",
//!  "iat":1700000000,"nbf":1700000000,"exp":1700000120,
//!  "jti":"7f3c…","roles":["operator"],"amr":["pwd","otp"],
//!  "cmd":{"tag":"FV-101.setpoint","value":42.5,"expect":40.0}}
//! ```
//! - `iss`: the issuer this gateway is configured to trust; `sub`: the
//!   operator; `aud`: this gateway's id, one string (not an array).
//! - `iat`, `nbf`, `exp`: whole seconds since the Unix epoch (JSON
//!   integers). `exp - iat` at most the configured lifetime (5 min by default).
//! - `jti`: 1 to 128 bytes, never reused (across commands and approvals).
//! - `roles`, `amr`: arrays of strings (at most 64 entries).
//! - `cmd.tag`: a tag name; `cmd.value`: a JSON scalar (bool, integer,
//!   number, string); `cmd.expect` (optional): the scalar the operator
//!   expects the tag to hold now.
//!
//! **Approval claims** (`twin_model::command::ApprovalClaims`): the same
//! members without `cmd`, plus
//! `"approves":{"jti":<the command's jti>,"sha256":<binding>}`, where the
//! binding is base64url(SHA-256(the command token's signing input)), the
//! signing input being everything before the command token's last `.`
//! (`twin_model::command::command_binding`). An approval is thus valid for
//! exactly one command token. An approval whose `sub` is the command's
//! operator is verified and marked [`VerifiedApproval::by_requester`]; the
//! policy refuses it (`duplicate_approver`).
//!
//! # Order of checks
//! [`TokenVerifier::verify`] stops at the first failure; each failure is a
//! [`Refusal`] with a stable [`Refusal::code`]:
//! 1. size, before anything is decoded: `too_large`;
//! 2. UTF-8: `not_utf8`; three base64url parts: `malformed`;
//! 3. header: a JSON object with string `alg`, `typ`, `kid`, no `crit`:
//!    `bad_header`; `alg` `none` (any case): `alg_none`; `alg` `HS*`:
//!    `alg_hmac`; `typ`: `wrong_typ`;
//! 4. `kid` in the local trust store: `unknown_kid`;
//! 5. `alg` equal to the one pinned for that key: `alg_mismatch`;
//! 6. signature: `bad_signature`;
//! 7. claims: nested deeper than 8 levels: `too_deep`; not exactly the
//!    members above with their types and bounds: `bad_claims`;
//! 8. `aud` = this gateway: `wrong_audience`; `iss`: `wrong_issuer`;
//! 9. `exp + leeway > now`: `expired`; `nbf - leeway <= now`:
//!    `not_yet_valid`; `iat - leeway <= now`: `issued_in_future`;
//!    `exp` before `iat`: `bad_claims`; `exp - iat` within the maximum
//!    lifetime: `lifetime_too_long`;
//! 10. for an approval: `approves` names this command: `wrong_command`;
//! 11. `jti` recorded durably in the [`replay::ReplayStore`]: seen before:
//!     `replayed`; store full or failing: `replay_store_unavailable`.
//!
//! # Why no JWT library
//! The checks use aws-lc-rs directly (Ed25519 and `ECDSA_P256_SHA256_FIXED`
//! public keys parsed once, when the trust store loads) rather than
//! `jsonwebtoken`. That library decodes the header, validates the claims
//! and verifies the signature in an order of its own, reports claim
//! failures with its own coarse error kinds, parses claims it has not yet
//! authenticated, checks neither `iat` nor `jti`, and panics at first use
//! when built without a crypto backend. Verifying by hand in a few dozen
//! lines gives the order above, one reason code per failure, and no new
//! dependency.

pub mod keys;
pub mod mint;
pub mod replay;

#[cfg(test)]
mod tests;

use crate::policy::{Approver, Command};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use serde::{Deserialize, Deserializer};
use twin_model::command::{
    binding_of_signing_input, ApprovalClaims, ClaimsError, CommandClaims, APPROVAL_TYP, COMMAND_TYP,
};
use twin_model::Value;

pub use keys::{Algorithm, KeyError, OperatorKey, OperatorTrustStore, TrustedKey};
pub use mint::{mint_approval, mint_command};
pub use replay::{ReplayError, ReplayOptions, ReplayStore};

/// Default largest token, in bytes.
pub const DEFAULT_MAX_TOKEN_BYTES: usize = 8 * 1024;
/// Default clock leeway for `exp`, `nbf` and `iat`.
pub const DEFAULT_LEEWAY_MS: u64 = 30_000;
/// Default longest `exp - iat`.
pub const DEFAULT_MAX_LIFETIME_MS: u64 = 5 * 60_000;

/// Longest untrusted string quoted in a refusal.
const QUOTE_MAX: usize = 64;

/// Why a token was refused. [`Refusal::code`] is stable: audit records and
/// the cloud may rely on it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("token is {len} bytes, more than the limit of {limit}")]
    TooLarge { len: usize, limit: usize },
    #[error("token is not UTF-8")]
    NotUtf8,
    #[error("token is not a JWS compact serialization: {0}")]
    Malformed(&'static str),
    #[error("header is not valid: {0}")]
    BadHeader(String),
    #[error("algorithm \"none\" is never accepted")]
    AlgNone,
    #[error("HMAC algorithm {0:?} is never accepted")]
    AlgHmac(String),
    #[error("algorithm {found:?} is not {pinned}, the one pinned for key {kid:?}")]
    AlgMismatch {
        kid: String,
        pinned: Algorithm,
        found: String,
    },
    #[error("type {found:?} where {expected:?} was expected")]
    WrongTyp {
        expected: &'static str,
        found: String,
    },
    #[error("key id {0:?} is not in the trust store")]
    UnknownKid(String),
    #[error("signature does not verify")]
    BadSignature,
    #[error("claims nest too deeply")]
    TooDeep,
    #[error("claims are not valid: {0}")]
    BadClaims(String),
    #[error("audience {0:?} is not this gateway")]
    WrongAudience(String),
    #[error("issuer {0:?} is not trusted")]
    WrongIssuer(String),
    #[error("token expired at {exp_ms} ms (now {now_ms} ms)")]
    Expired { exp_ms: u64, now_ms: u64 },
    #[error("token is not valid before {nbf_ms} ms (now {now_ms} ms)")]
    NotYetValid { nbf_ms: u64, now_ms: u64 },
    #[error("token issued at {iat_ms} ms, in the future (now {now_ms} ms)")]
    IssuedInFuture { iat_ms: u64, now_ms: u64 },
    #[error("token lifetime {lifetime_ms} ms is longer than {max_ms} ms")]
    LifetimeTooLong { lifetime_ms: u64, max_ms: u64 },
    #[error("approval is for another command")]
    WrongCommand,
    #[error("token id was seen before")]
    Replayed,
    #[error("replay store unavailable: {0}")]
    ReplayStoreUnavailable(String),
}

impl Refusal {
    /// Stable machine-readable reason code.
    pub fn code(&self) -> &'static str {
        match self {
            Refusal::TooLarge { .. } => "too_large",
            Refusal::NotUtf8 => "not_utf8",
            Refusal::Malformed(_) => "malformed",
            Refusal::BadHeader(_) => "bad_header",
            Refusal::AlgNone => "alg_none",
            Refusal::AlgHmac(_) => "alg_hmac",
            Refusal::AlgMismatch { .. } => "alg_mismatch",
            Refusal::WrongTyp { .. } => "wrong_typ",
            Refusal::UnknownKid(_) => "unknown_kid",
            Refusal::BadSignature => "bad_signature",
            Refusal::TooDeep => "too_deep",
            Refusal::BadClaims(_) => "bad_claims",
            Refusal::WrongAudience(_) => "wrong_audience",
            Refusal::WrongIssuer(_) => "wrong_issuer",
            Refusal::Expired { .. } => "expired",
            Refusal::NotYetValid { .. } => "not_yet_valid",
            Refusal::IssuedInFuture { .. } => "issued_in_future",
            Refusal::LifetimeTooLong { .. } => "lifetime_too_long",
            Refusal::WrongCommand => "wrong_command",
            Refusal::Replayed => "replayed",
            Refusal::ReplayStoreUnavailable(_) => "replay_store_unavailable",
        }
    }
}

/// What a [`TokenVerifier`] accepts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifierConfig {
    /// This gateway's id: the only accepted `aud`.
    pub gateway_id: String,
    /// The only accepted `iss`.
    pub issuer: String,
    /// Largest token in bytes, checked before anything is decoded.
    pub max_token_bytes: usize,
    /// Clock leeway for `exp`, `nbf` and `iat`.
    pub leeway_ms: u64,
    /// Longest accepted `exp - iat`.
    pub max_lifetime_ms: u64,
}

impl VerifierConfig {
    /// The defaults: 8 KiB, 30 s leeway, 5 min lifetime.
    pub fn new(gateway_id: impl Into<String>, issuer: impl Into<String>) -> Self {
        VerifierConfig {
            gateway_id: gateway_id.into(),
            issuer: issuer.into(),
            max_token_bytes: DEFAULT_MAX_TOKEN_BYTES,
            leeway_ms: DEFAULT_LEEWAY_MS,
            max_lifetime_ms: DEFAULT_MAX_LIFETIME_MS,
        }
    }
}

/// A command token that passed every check, its `jti` recorded.
#[derive(Debug, Clone, PartialEq)]
pub struct VerifiedCommand {
    /// The token's `jti`: the command id.
    pub jti: String,
    /// The token's `sub`.
    pub operator: String,
    pub roles: Vec<String>,
    pub amr: Vec<String>,
    pub tag: String,
    pub value: Value,
    /// The value the operator expects the tag to have now, if given.
    pub expect: Option<Value>,
    pub issued_at_ms: u64,
    pub expires_at_ms: u64,
    /// The key that signed, and its algorithm.
    pub kid: String,
    pub alg: Algorithm,
    /// base64url SHA-256 of the signing input: what approvals must name.
    pub binding: String,
    /// The token exactly as received, for the audit log.
    pub token: String,
}

impl VerifiedCommand {
    /// The command as the policy sees it, with these approvals (all of
    /// them: the policy refuses a self-approval or a repeated approver).
    pub fn to_policy_command(&self, approvals: &[VerifiedApproval]) -> Command {
        Command {
            id: self.jti.clone(),
            tag: self.tag.clone(),
            value: self.value.clone(),
            operator: self.operator.clone(),
            roles: self.roles.clone(),
            amr: self.amr.clone(),
            approvers: approvals.iter().map(|a| a.approver.clone()).collect(),
            at_ms: self.issued_at_ms,
        }
    }
}

/// An approval token that passed every check and names the command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedApproval {
    /// The approval's own `jti`.
    pub jti: String,
    /// The approving operator (`sub`) and their `roles`.
    pub approver: Approver,
    pub amr: Vec<String>,
    /// The approver is the operator who requested the command.
    pub by_requester: bool,
    pub issued_at_ms: u64,
    pub expires_at_ms: u64,
    pub kid: String,
    pub alg: Algorithm,
    /// The token exactly as received, for the audit log.
    pub token: String,
}

/// Verifies command and approval tokens against a trust store, a
/// configuration and a replay store. See the module documentation for the
/// order of checks.
#[derive(Debug)]
pub struct TokenVerifier {
    trust: OperatorTrustStore,
    config: VerifierConfig,
    replay: ReplayStore,
}

/// The protected header: only these members are read; others are skipped
/// unread (never used).
#[derive(Deserialize)]
struct Header {
    alg: String,
    typ: String,
    kid: String,
    #[serde(default, deserialize_with = "present")]
    crit: bool,
}

fn present<'de, D: Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    serde::de::IgnoredAny::deserialize(d).map(|_| true)
}

/// A token whose header, key and signature checked out.
struct Authentic<'a> {
    text: &'a str,
    signing_input: &'a str,
    payload: Vec<u8>,
    kid: String,
    alg: Algorithm,
}

/// Registered claims checked the same way for commands and approvals.
struct Registered<'a> {
    iss: &'a str,
    aud: &'a str,
    iat: u64,
    nbf: u64,
    exp: u64,
}

fn quote(s: &str) -> String {
    match s.char_indices().nth(QUOTE_MAX) {
        Some((at, _)) => format!("{}…", s.get(..at).unwrap_or_default()),
        None => s.to_owned(),
    }
}

fn secs_to_ms(what: &str, secs: u64) -> Result<u64, Refusal> {
    secs.checked_mul(1000)
        .ok_or_else(|| Refusal::BadClaims(format!("{what} is out of range")))
}

impl TokenVerifier {
    pub fn new(trust: OperatorTrustStore, config: VerifierConfig, replay: ReplayStore) -> Self {
        TokenVerifier {
            trust,
            config,
            replay,
        }
    }

    pub fn config(&self) -> &VerifierConfig {
        &self.config
    }

    pub fn trust_store(&self) -> &OperatorTrustStore {
        &self.trust
    }

    /// Verifies a command token; on success its `jti` is recorded (durably)
    /// and the token can never be accepted again.
    pub fn verify(&self, bytes: &[u8], now_ms: u64) -> Result<VerifiedCommand, Refusal> {
        let a = self.authenticate(bytes, COMMAND_TYP)?;
        let c = CommandClaims::from_json(&a.payload).map_err(claims_refusal)?;
        let (iat_ms, exp_ms) = self.check_registered(
            &Registered {
                iss: &c.iss,
                aud: &c.aud,
                iat: c.iat,
                nbf: c.nbf,
                exp: c.exp,
            },
            now_ms,
        )?;
        self.replay.check_and_record(&c.jti, exp_ms, now_ms)?;
        Ok(VerifiedCommand {
            jti: c.jti,
            operator: c.sub,
            roles: c.roles,
            amr: c.amr,
            tag: c.cmd.tag,
            value: c.cmd.value,
            expect: c.cmd.expect,
            issued_at_ms: iat_ms,
            expires_at_ms: exp_ms,
            kid: a.kid,
            alg: a.alg,
            binding: binding_of_signing_input(a.signing_input.as_bytes()),
            token: a.text.to_owned(),
        })
    }

    /// Verifies an approval token of `command`: the checks of
    /// [`TokenVerifier::verify`], then the binding to `command` (before
    /// its `jti` is recorded).
    pub fn verify_approval(
        &self,
        bytes: &[u8],
        command: &VerifiedCommand,
        now_ms: u64,
    ) -> Result<VerifiedApproval, Refusal> {
        let a = self.authenticate(bytes, APPROVAL_TYP)?;
        let c = ApprovalClaims::from_json(&a.payload).map_err(claims_refusal)?;
        let (iat_ms, exp_ms) = self.check_registered(
            &Registered {
                iss: &c.iss,
                aud: &c.aud,
                iat: c.iat,
                nbf: c.nbf,
                exp: c.exp,
            },
            now_ms,
        )?;
        let same_hash = aws_lc_rs::constant_time::verify_slices_are_equal(
            c.approves.sha256.as_bytes(),
            command.binding.as_bytes(),
        )
        .is_ok();
        if c.approves.jti != command.jti || !same_hash {
            return Err(Refusal::WrongCommand);
        }
        self.replay.check_and_record(&c.jti, exp_ms, now_ms)?;
        Ok(VerifiedApproval {
            jti: c.jti,
            by_requester: c.sub == command.operator,
            approver: Approver {
                subject: c.sub,
                roles: c.roles,
            },
            amr: c.amr,
            issued_at_ms: iat_ms,
            expires_at_ms: exp_ms,
            kid: a.kid,
            alg: a.alg,
            token: a.text.to_owned(),
        })
    }

    /// Steps 1 to 6: size, shape, header, key, pinned algorithm, signature.
    fn authenticate<'a>(
        &self,
        bytes: &'a [u8],
        typ: &'static str,
    ) -> Result<Authentic<'a>, Refusal> {
        if bytes.len() > self.config.max_token_bytes {
            return Err(Refusal::TooLarge {
                len: bytes.len(),
                limit: self.config.max_token_bytes,
            });
        }
        let text = std::str::from_utf8(bytes).map_err(|_| Refusal::NotUtf8)?;
        let mut parts = text.split('.');
        let (Some(h64), Some(p64), Some(s64), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(Refusal::Malformed("expected three dot-separated parts"));
        };
        let b64 = |part: &str, what: &'static str| {
            URL_SAFE_NO_PAD
                .decode(part)
                .map_err(|_| Refusal::Malformed(what))
        };
        let header_json = b64(h64, "header is not base64url")?;
        let payload = b64(p64, "payload is not base64url")?;
        let signature = b64(s64, "signature is not base64url")?;
        let signing_input = text
            .get(..h64.len() + 1 + p64.len())
            .ok_or(Refusal::Malformed("truncated"))?;

        let header = parse_header(&header_json)?;
        if header.alg.eq_ignore_ascii_case("none") {
            return Err(Refusal::AlgNone);
        }
        if header
            .alg
            .get(..2)
            .is_some_and(|p| p.eq_ignore_ascii_case("HS"))
        {
            return Err(Refusal::AlgHmac(quote(&header.alg)));
        }
        if header.typ != typ {
            return Err(Refusal::WrongTyp {
                expected: typ,
                found: quote(&header.typ),
            });
        }
        let key = self
            .trust
            .get(&header.kid)
            .ok_or_else(|| Refusal::UnknownKid(quote(&header.kid)))?;
        if header.alg != key.algorithm().as_str() {
            return Err(Refusal::AlgMismatch {
                kid: key.kid().to_owned(),
                pinned: key.algorithm(),
                found: quote(&header.alg),
            });
        }
        if !key.verify(signing_input.as_bytes(), &signature) {
            return Err(Refusal::BadSignature);
        }
        Ok(Authentic {
            text,
            signing_input,
            payload,
            kid: header.kid,
            alg: key.algorithm(),
        })
    }

    /// Steps 8 and 9; returns `iat` and `exp` in milliseconds.
    fn check_registered(&self, c: &Registered<'_>, now_ms: u64) -> Result<(u64, u64), Refusal> {
        let cfg = &self.config;
        let iat_ms = secs_to_ms("iat", c.iat)?;
        let nbf_ms = secs_to_ms("nbf", c.nbf)?;
        let exp_ms = secs_to_ms("exp", c.exp)?;
        if c.aud != cfg.gateway_id {
            return Err(Refusal::WrongAudience(quote(c.aud)));
        }
        if c.iss != cfg.issuer {
            return Err(Refusal::WrongIssuer(quote(c.iss)));
        }
        if exp_ms.saturating_add(cfg.leeway_ms) <= now_ms {
            return Err(Refusal::Expired { exp_ms, now_ms });
        }
        if nbf_ms > now_ms.saturating_add(cfg.leeway_ms) {
            return Err(Refusal::NotYetValid { nbf_ms, now_ms });
        }
        if iat_ms > now_ms.saturating_add(cfg.leeway_ms) {
            return Err(Refusal::IssuedInFuture { iat_ms, now_ms });
        }
        let lifetime_ms = exp_ms
            .checked_sub(iat_ms)
            .ok_or_else(|| Refusal::BadClaims("exp is before iat".into()))?;
        if lifetime_ms > cfg.max_lifetime_ms {
            return Err(Refusal::LifetimeTooLong {
                lifetime_ms,
                max_ms: cfg.max_lifetime_ms,
            });
        }
        Ok((iat_ms, exp_ms))
    }
}

/// Strict header parse: a JSON object (serde would also take an array),
/// `alg`, `typ`, `kid` strings given once, no `crit`.
fn parse_header(json: &[u8]) -> Result<Header, Refusal> {
    let first = json.iter().find(|b| !b.is_ascii_whitespace());
    if first != Some(&b'{') {
        return Err(Refusal::BadHeader("not a JSON object".into()));
    }
    let header: Header =
        serde_json::from_slice(json).map_err(|e| Refusal::BadHeader(e.to_string()))?;
    if header.crit {
        return Err(Refusal::BadHeader(
            "`crit` names extensions this gateway does not understand".into(),
        ));
    }
    Ok(header)
}

fn claims_refusal(e: ClaimsError) -> Refusal {
    match e {
        ClaimsError::TooDeep => Refusal::TooDeep,
        ClaimsError::Invalid(why) => Refusal::BadClaims(why),
    }
}
