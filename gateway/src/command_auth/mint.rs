//! Making command and approval tokens, for the operator tool and tests.

use super::keys::OperatorKey;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use serde::Serialize;
use twin_model::command::{ApprovalClaims, CommandClaims, APPROVAL_TYP, COMMAND_TYP};

/// The protected header every minted token carries. Field order is the
/// serialization order.
#[derive(Serialize)]
struct Header<'a> {
    alg: &'a str,
    typ: &'a str,
    kid: &'a str,
}

/// Signs `payload` as a JWS compact serialization with the header
/// `{"alg":<the key's algorithm>,"typ":typ,"kid":<the key's id>}`.
pub fn sign_compact(key: &OperatorKey, typ: &str, payload: &[u8]) -> String {
    let header = Header {
        alg: key.algorithm().as_str(),
        typ,
        kid: key.kid(),
    };
    let header = serde_json::to_vec(&header).expect("a header of strings serializes");
    sign_with_header(key, &header, payload)
}

/// Signs `payload` under an arbitrary header (JSON bytes). For tests of
/// what the verifier refuses.
pub fn sign_with_header(key: &OperatorKey, header_json: &[u8], payload: &[u8]) -> String {
    let mut out = URL_SAFE_NO_PAD.encode(header_json);
    out.push('.');
    URL_SAFE_NO_PAD.encode_string(payload, &mut out);
    let sig = key.sign(out.as_bytes());
    out.push('.');
    URL_SAFE_NO_PAD.encode_string(sig, &mut out);
    out
}

/// A command token (`typ` `twin-command+jwt`) signed with `key`.
pub fn mint_command(key: &OperatorKey, claims: &CommandClaims) -> String {
    let payload = serde_json::to_vec(claims).expect("command claims serialize");
    sign_compact(key, COMMAND_TYP, &payload)
}

/// An approval token (`typ` `twin-approval+jwt`) signed with `key`.
pub fn mint_approval(key: &OperatorKey, claims: &ApprovalClaims) -> String {
    let payload = serde_json::to_vec(claims).expect("approval claims serialize");
    sign_compact(key, APPROVAL_TYP, &payload)
}
