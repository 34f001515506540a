//! Claims of operator-signed command and approval tokens.
//!
//! A command token is a JWT (JWS compact serialization) with the protected
//! header `{"alg":"EdDSA"|"ES256","typ":"twin-command+jwt","kid":…}` and
//! a [`CommandClaims`] payload. An approval token has `typ`
//! `twin-approval+jwt` and an [`ApprovalClaims`] payload whose `approves`
//! names the command by `jti` and by [`command_binding`], so an approval
//! cannot be moved to another command.
//!
//! Times are JWT NumericDates: whole seconds since the Unix epoch, as JSON
//! integers (no fractions, no strings). `aud` is one string (the gateway
//! id), not an array.
//!
//! This module only defines the claims and their strict decoding
//! ([`CommandClaims::from_json`], [`ApprovalClaims::from_json`]): the
//! signature, the header and the checks against a clock and a gateway live
//! with the verifier (`gateway::command_auth`).

use crate::jws::{b64url, sha256};
use crate::Value;
use serde::{Deserialize, Serialize};

/// `typ` header of a command token.
pub const COMMAND_TYP: &str = "twin-command+jwt";
/// `typ` header of an approval token.
pub const APPROVAL_TYP: &str = "twin-approval+jwt";

/// Deepest nesting of arrays and objects accepted in a claims payload. The
/// claims need two levels (the claims object, then `cmd` or `roles`);
/// anything deeper is refused before it is parsed.
pub const MAX_CLAIMS_DEPTH: usize = 8;
/// Longest `jti`, in bytes.
pub const MAX_JTI_BYTES: usize = 128;
/// Longest `iss`, `sub`, `aud`, tag name, role or method, in bytes.
pub const MAX_NAME_BYTES: usize = 256;
/// Most entries in `roles` or in `amr`.
pub const MAX_LIST_LEN: usize = 64;

/// The command itself: which tag to write, and to what.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommandBody {
    /// The tag to write (a name from the gateway's configuration, never an address).
    pub tag: String,
    /// The value to write, a JSON scalar in engineering units.
    pub value: Value,
    /// The value the operator expects the tag to have now (optional): a
    /// guard against acting on a stale screen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expect: Option<Value>,
}

/// Payload of a command token (`typ` = [`COMMAND_TYP`]). Field order is the
/// serialization order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommandClaims {
    /// The issuer: the operator identity service.
    pub iss: String,
    /// The operator who requests the command.
    pub sub: String,
    /// The gateway id the command is for.
    pub aud: String,
    /// Issued at, seconds since the Unix epoch.
    pub iat: u64,
    /// Not before, seconds since the Unix epoch.
    pub nbf: u64,
    /// Expires at, seconds since the Unix epoch.
    pub exp: u64,
    /// Unique token id; also the command id. Unique across commands and
    /// approvals of one issuer.
    pub jti: String,
    /// Roles of the operator.
    pub roles: Vec<String>,
    /// Authentication methods used by the operator (RFC 8176), e.g. `["pwd","otp"]`.
    pub amr: Vec<String>,
    pub cmd: CommandBody,
}

/// What an approval approves: one command, by id and by content.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Approves {
    /// The `jti` of the command token.
    pub jti: String,
    /// [`command_binding`] of the command token.
    pub sha256: String,
}

/// Payload of an approval token (`typ` = [`APPROVAL_TYP`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApprovalClaims {
    pub iss: String,
    /// The approving operator.
    pub sub: String,
    pub aud: String,
    pub iat: u64,
    pub nbf: u64,
    pub exp: u64,
    /// Unique token id of the approval itself.
    pub jti: String,
    pub roles: Vec<String>,
    pub amr: Vec<String>,
    pub approves: Approves,
}

/// Most approval tokens in one command message.
pub const MAX_APPROVALS: usize = 16;
/// Deepest nesting accepted in a command message envelope (the object and
/// its `approvals` array).
pub const MAX_ENVELOPE_DEPTH: usize = 2;

/// A message on the command topic: one command token and the approval
/// tokens that go with it.
///
/// On the wire it is either the bare command token (JWS compact, ASCII),
/// or a JSON object `{"command":"<token>","approvals":["<token>",…]}` with
/// exactly these members (`approvals` may be absent or empty). Only the
/// shape is checked here; the tokens are verified by the gateway.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Envelope {
    pub command: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub approvals: Vec<String>,
}

/// Why a command message is not an [`Envelope`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvelopeError {
    #[error("message is not UTF-8")]
    NotUtf8,
    #[error("message nests deeper than {MAX_ENVELOPE_DEPTH} levels")]
    TooDeep,
    #[error("message is not a command envelope: {0}")]
    Invalid(String),
}

impl EnvelopeError {
    /// The reason code a refusal reports (shared with the token checks).
    pub fn code(&self) -> &'static str {
        match self {
            EnvelopeError::NotUtf8 => "not_utf8",
            EnvelopeError::TooDeep => "too_deep",
            EnvelopeError::Invalid(_) => "bad_envelope",
        }
    }
}

impl Envelope {
    /// Reads a command message: a bare token, or the JSON envelope. The
    /// caller checks the message size first.
    pub fn parse(message: &[u8]) -> Result<Envelope, EnvelopeError> {
        let text = std::str::from_utf8(message).map_err(|_| EnvelopeError::NotUtf8)?;
        let trimmed = text.trim_matches(|c: char| c.is_ascii_whitespace());
        if trimmed.starts_with('[') {
            return Err(EnvelopeError::Invalid(
                "a command message is a token or a JSON object, not an array".into(),
            ));
        }
        if !trimmed.starts_with('{') {
            return Ok(Envelope {
                command: trimmed.to_owned(),
                approvals: Vec::new(),
            });
        }
        if nesting_depth(trimmed.as_bytes(), MAX_ENVELOPE_DEPTH) > MAX_ENVELOPE_DEPTH {
            return Err(EnvelopeError::TooDeep);
        }
        let env: Envelope =
            serde_json::from_str(trimmed).map_err(|e| EnvelopeError::Invalid(e.to_string()))?;
        if env.approvals.len() > MAX_APPROVALS {
            return Err(EnvelopeError::Invalid(format!(
                "more than {MAX_APPROVALS} approvals"
            )));
        }
        Ok(env)
    }

    /// The message as the operator tool sends it: the bare token when there
    /// are no approvals, the JSON envelope otherwise.
    pub fn to_message(&self) -> Vec<u8> {
        if self.approvals.is_empty() {
            self.command.clone().into_bytes()
        } else {
            serde_json::to_vec(self).expect("envelope serializes")
        }
    }
}

/// Why a claims payload was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClaimsError {
    #[error("claims nest deeper than {MAX_CLAIMS_DEPTH} levels")]
    TooDeep,
    #[error("claims are not valid: {0}")]
    Invalid(String),
}

/// The binding of an approval to a command token: base64url (no padding)
/// of the SHA-256 of the command token's signing input, that is of the
/// ASCII bytes `BASE64URL(header) "." BASE64URL(payload)` (everything
/// before the last `.`). `None` when `token` has no `.`.
pub fn command_binding(token: &str) -> Option<String> {
    let (signing_input, _signature) = token.rsplit_once('.')?;
    Some(binding_of_signing_input(signing_input.as_bytes()))
}

/// [`command_binding`] from the signing input itself.
pub fn binding_of_signing_input(signing_input: &[u8]) -> String {
    b64url(&sha256(signing_input))
}

impl CommandClaims {
    /// Decodes a payload strictly: a JSON object nested at most
    /// [`MAX_CLAIMS_DEPTH`] deep, no unknown or repeated members, every
    /// member of its type, then [`CommandClaims::check_bounds`].
    pub fn from_json(payload: &[u8]) -> Result<Self, ClaimsError> {
        let claims: CommandClaims = strict_parse(payload, "cmd")?;
        claims.check_bounds()?;
        Ok(claims)
    }

    /// Non-empty names within their length limits, lists within theirs.
    pub fn check_bounds(&self) -> Result<(), ClaimsError> {
        common_bounds(
            &self.iss,
            &self.sub,
            &self.aud,
            &self.jti,
            &self.roles,
            &self.amr,
        )?;
        name("cmd.tag", &self.cmd.tag)
    }
}

impl ApprovalClaims {
    /// Decodes a payload strictly, as [`CommandClaims::from_json`] does.
    pub fn from_json(payload: &[u8]) -> Result<Self, ClaimsError> {
        let claims: ApprovalClaims = strict_parse(payload, "approves")?;
        claims.check_bounds()?;
        Ok(claims)
    }

    pub fn check_bounds(&self) -> Result<(), ClaimsError> {
        common_bounds(
            &self.iss,
            &self.sub,
            &self.aud,
            &self.jti,
            &self.roles,
            &self.amr,
        )?;
        jti("approves.jti", &self.approves.jti)?;
        if self.approves.sha256.len() != 43 {
            return Err(ClaimsError::Invalid(
                "approves.sha256 is not a base64url SHA-256".into(),
            ));
        }
        Ok(())
    }
}

fn common_bounds(
    iss: &str,
    sub: &str,
    aud: &str,
    id: &str,
    roles: &[String],
    amr: &[String],
) -> Result<(), ClaimsError> {
    name("iss", iss)?;
    name("sub", sub)?;
    name("aud", aud)?;
    jti("jti", id)?;
    list("roles", roles)?;
    list("amr", amr)
}

fn name(what: &str, s: &str) -> Result<(), ClaimsError> {
    if s.is_empty() || s.len() > MAX_NAME_BYTES {
        return Err(ClaimsError::Invalid(format!(
            "{what} must be 1 to {MAX_NAME_BYTES} bytes"
        )));
    }
    Ok(())
}

fn jti(what: &str, s: &str) -> Result<(), ClaimsError> {
    if s.is_empty() || s.len() > MAX_JTI_BYTES {
        return Err(ClaimsError::Invalid(format!(
            "{what} must be 1 to {MAX_JTI_BYTES} bytes"
        )));
    }
    Ok(())
}

fn list(what: &str, items: &[String]) -> Result<(), ClaimsError> {
    if items.len() > MAX_LIST_LEN {
        return Err(ClaimsError::Invalid(format!(
            "{what} has more than {MAX_LIST_LEN} entries"
        )));
    }
    items.iter().try_for_each(|s| name(what, s))
}

/// The deepest nesting of arrays and objects in `json`, counted outside
/// strings; stops counting once `limit` is exceeded. Meaningful for valid
/// JSON; for anything else the parse that follows refuses it.
pub fn nesting_depth(json: &[u8], limit: usize) -> usize {
    let (mut depth, mut max, mut in_string, mut escaped) = (0usize, 0usize, false, false);
    for &b in json {
        if in_string {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'{' | b'[' => {
                depth += 1;
                max = max.max(depth);
                if max > limit {
                    return max;
                }
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    max
}

/// Depth check, then a shape check (the payload and its one nested struct
/// member are JSON objects: serde would also accept a struct written as an
/// array), then the typed parse (unknown and repeated members refused).
fn strict_parse<T: serde::de::DeserializeOwned>(
    payload: &[u8],
    nested: &str,
) -> Result<T, ClaimsError> {
    if nesting_depth(payload, MAX_CLAIMS_DEPTH) > MAX_CLAIMS_DEPTH {
        return Err(ClaimsError::TooDeep);
    }
    let value: serde_json::Value = serde_json::from_slice(payload).map_err(invalid)?;
    let serde_json::Value::Object(map) = &value else {
        return Err(ClaimsError::Invalid("claims are not a JSON object".into()));
    };
    if let Some(inner) = map.get(nested) {
        if !inner.is_object() {
            return Err(ClaimsError::Invalid(format!(
                "{nested} is not a JSON object"
            )));
        }
    }
    serde_json::from_slice(payload).map_err(invalid)
}

fn invalid(e: serde_json::Error) -> ClaimsError {
    // Unreachable after the depth check, kept so a deep payload is never
    // reported as merely invalid.
    if e.to_string().contains("recursion limit exceeded") {
        return ClaimsError::TooDeep;
    }
    ClaimsError::Invalid(e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_envelope_is_a_bare_token_or_an_object_and_nothing_else() {
        let bare = Envelope::parse(b"  a.b.c\n").unwrap();
        assert_eq!((bare.command.as_str(), bare.approvals.len()), ("a.b.c", 0));
        let env = Envelope::parse(br#"{"command":"a.b.c","approvals":["d.e.f"]}"#).unwrap();
        assert_eq!(env.approvals, vec!["d.e.f".to_string()]);
        assert_eq!(Envelope::parse(&env.to_message()).unwrap(), env);
        for (bad, code) in [
            (&br#"["a.b.c",["d.e.f"]]"#[..], "bad_envelope"),
            (br#"{"command":42}"#, "bad_envelope"),
            (br#"{"command":"a","x":1}"#, "bad_envelope"),
            (br#"{"command":[[["a"]]]}"#, "too_deep"),
            (b"\xff\xfe", "not_utf8"),
        ] {
            assert_eq!(Envelope::parse(bad).unwrap_err().code(), code, "{bad:?}");
        }
    }

    fn claims() -> CommandClaims {
        CommandClaims {
            iss: "ops".into(),
            sub: "alice".into(),
            aud: "gw-1".into(),
            iat: 1_700_000_000,
            nbf: 1_700_000_000,
            exp: 1_700_000_060,
            jti: "c-1".into(),
            roles: vec!["operator".into()],
            amr: vec!["pwd".into(), "otp".into()],
            cmd: CommandBody {
                tag: "FV-101.setpoint".into(),
                value: Value::Float(42.5),
                expect: None,
            },
        }
    }

    #[test]
    fn command_claims_round_trip_and_omit_an_absent_expect() {
        let c = claims();
        let json = serde_json::to_vec(&c).unwrap();
        assert!(!String::from_utf8_lossy(&json).contains("expect"));
        assert_eq!(CommandClaims::from_json(&json).unwrap(), c);
        let mut with = c.clone();
        with.cmd.expect = Some(Value::Int(7));
        let json = serde_json::to_vec(&with).unwrap();
        assert_eq!(CommandClaims::from_json(&json).unwrap(), with);
    }

    #[test]
    fn unknown_repeated_and_mistyped_members_are_refused() {
        let json = String::from_utf8(serde_json::to_vec(&claims()).unwrap()).unwrap();
        let extra = json.replacen('{', r#"{"admin":true,"#, 1);
        assert!(matches!(
            CommandClaims::from_json(extra.as_bytes()),
            Err(ClaimsError::Invalid(_))
        ));
        let repeated = json.replacen('{', r#"{"aud":"gw-2","#, 1);
        assert!(matches!(
            CommandClaims::from_json(repeated.as_bytes()),
            Err(ClaimsError::Invalid(_))
        ));
        let exp_string = json.replace("1700000060", "\"1700000060\"");
        assert!(CommandClaims::from_json(exp_string.as_bytes()).is_err());
        let cmd_array = json.replace(
            r#""cmd":{"tag":"FV-101.setpoint","value":42.5}"#,
            r#""cmd":["FV-101.setpoint",42.5]"#,
        );
        assert_ne!(cmd_array, json);
        assert!(CommandClaims::from_json(cmd_array.as_bytes()).is_err());
        assert!(CommandClaims::from_json(b"[]").is_err());
    }

    #[test]
    fn deep_nesting_is_refused_before_parsing() {
        let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        assert_eq!(
            CommandClaims::from_json(deep.as_bytes()),
            Err(ClaimsError::TooDeep)
        );
        assert_eq!(nesting_depth(br#"{"a":"[[[[[[[[[[[[\"[["}"#, 8), 1);
    }

    #[test]
    fn binding_hashes_the_signing_input() {
        assert_eq!(
            command_binding("a.b.sig"),
            Some(binding_of_signing_input(b"a.b"))
        );
        assert_eq!(command_binding("nodot"), None);
    }
}
