//! JWS compact serialization (RFC 7515) with EdDSA over Ed25519 (RFC 8037).
//!
//! A message is `BASE64URL(header) "." BASE64URL(payload) "." BASE64URL(signature)`
//! without padding. The header is exactly `{"alg":"EdDSA","kid":…,"typ":…}`;
//! the signature covers the ASCII bytes of the first two parts. The payload
//! bytes are signed as sent: nothing is re-serialized before verifying.
//!
//! Key ids are RFC 7638 JWK thumbprints of the public key, so anyone holding
//! the public key can compute the `kid` it is published under.

use aws_lc_rs::signature::{self, Ed25519KeyPair, KeyPair, UnparsedPublicKey};
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// DER prefix of an Ed25519 SubjectPublicKeyInfo (RFC 8410); the 32 key bytes follow.
const ED25519_SPKI_PREFIX: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];

/// Why a JWS was refused. Each variant has a stable [`JwsError::code`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwsError {
    #[error("message is {len} bytes, more than the limit of {limit}")]
    TooLarge { len: usize, limit: usize },
    #[error("not a JWS compact serialization: {0}")]
    Malformed(&'static str),
    #[error("header is not valid: {0}")]
    BadHeader(String),
    #[error("algorithm {0:?} is not accepted (only EdDSA)")]
    BadAlgorithm(String),
    #[error("type {found:?} where {expected:?} was expected")]
    WrongType { expected: String, found: String },
    #[error("key id {0:?} is not in the trust store")]
    UnknownKey(String),
    #[error("signature does not verify")]
    BadSignature,
    #[error("payload is not valid: {0}")]
    BadPayload(String),
}

impl JwsError {
    /// Stable machine-readable reason code.
    pub fn code(&self) -> &'static str {
        match self {
            JwsError::TooLarge { .. } => "too_large",
            JwsError::Malformed(_) => "malformed",
            JwsError::BadHeader(_) => "bad_header",
            JwsError::BadAlgorithm(_) => "bad_algorithm",
            JwsError::WrongType { .. } => "wrong_type",
            JwsError::UnknownKey(_) => "unknown_key",
            JwsError::BadSignature => "bad_signature",
            JwsError::BadPayload(_) => "bad_payload",
        }
    }
}

/// The protected header. Field order is the serialization order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Header {
    pub alg: String,
    pub kid: String,
    pub typ: String,
}

/// An Ed25519 signing key with its key id.
pub struct SigningKey {
    pair: Ed25519KeyPair,
    kid: String,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKey")
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

impl SigningKey {
    /// From a PKCS#8 (v1 or v2) DER document.
    pub fn from_pkcs8_der(der: &[u8]) -> Result<Self, JwsError> {
        let pair = Ed25519KeyPair::from_pkcs8_maybe_unchecked(der)
            .map_err(|_| JwsError::BadPayload("not an Ed25519 PKCS#8 private key".into()))?;
        Ok(Self::from_pair(pair))
    }

    /// From a PEM `PRIVATE KEY` block (PKCS#8).
    pub fn from_pkcs8_pem(pem: &str) -> Result<Self, JwsError> {
        let der = pem_decode(pem, "PRIVATE KEY")
            .ok_or(JwsError::Malformed("no PEM PRIVATE KEY block"))?;
        Self::from_pkcs8_der(&der)
    }

    /// From a 32-byte seed. Ed25519 signatures are deterministic, so a fixed
    /// seed gives fixed signatures: used for golden test vectors.
    pub fn from_seed(seed: &[u8; 32]) -> Result<Self, JwsError> {
        let pair = Ed25519KeyPair::from_seed_unchecked(seed)
            .map_err(|_| JwsError::BadPayload("invalid Ed25519 seed".into()))?;
        Ok(Self::from_pair(pair))
    }

    fn from_pair(pair: Ed25519KeyPair) -> Self {
        let kid = jwk_thumbprint(pair.public_key().as_ref());
        SigningKey { pair, kid }
    }

    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The raw 32-byte public key.
    pub fn public_key(&self) -> [u8; 32] {
        let mut out = [0u8; 32];
        out.copy_from_slice(self.pair.public_key().as_ref());
        out
    }

    /// The public key as a PEM `PUBLIC KEY` (SubjectPublicKeyInfo).
    pub fn public_key_pem(&self) -> String {
        public_key_pem(&self.public_key())
    }

    /// Signs `payload` as a JWS compact serialization with header type `typ`.
    pub fn sign_compact(&self, typ: &str, payload: &[u8]) -> String {
        let header = Header {
            alg: "EdDSA".into(),
            kid: self.kid.clone(),
            typ: typ.into(),
        };
        let header_json = serde_json::to_vec(&header).expect("header serializes");
        let b64_len = |n: usize| n.div_ceil(3) * 4;
        let mut out =
            String::with_capacity(b64_len(header_json.len()) + b64_len(payload.len()) + 90);
        URL_SAFE_NO_PAD.encode_string(&header_json, &mut out);
        out.push('.');
        URL_SAFE_NO_PAD.encode_string(payload, &mut out);
        let sig = self.pair.sign(out.as_bytes());
        out.push('.');
        URL_SAFE_NO_PAD.encode_string(sig.as_ref(), &mut out);
        out
    }
}

/// RFC 7638 thumbprint of an Ed25519 public key: base64url(SHA-256 of
/// `{"crv":"Ed25519","kty":"OKP","x":"<base64url key>"}`).
pub fn jwk_thumbprint(public_key: &[u8]) -> String {
    let jwk = format!(
        r#"{{"crv":"Ed25519","kty":"OKP","x":"{}"}}"#,
        URL_SAFE_NO_PAD.encode(public_key)
    );
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, jwk.as_bytes());
    URL_SAFE_NO_PAD.encode(d.as_ref())
}

/// PEM `PUBLIC KEY` for a raw Ed25519 public key.
pub fn public_key_pem(raw: &[u8; 32]) -> String {
    let mut der = ED25519_SPKI_PREFIX.to_vec();
    der.extend_from_slice(raw);
    pem_encode("PUBLIC KEY", &der)
}

/// Raw Ed25519 key from a PEM `PUBLIC KEY` block.
pub fn public_key_from_pem(pem: &str) -> Option<[u8; 32]> {
    let der = pem_decode(pem, "PUBLIC KEY")?;
    let key = der.strip_prefix(&ED25519_SPKI_PREFIX[..])?;
    key.try_into().ok()
}

/// Encodes DER as a PEM block with 64-column lines.
pub fn pem_encode(label: &str, der: &[u8]) -> String {
    let b64 = STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(chunk).expect("base64 is ASCII"));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// Decodes the first PEM block labelled `label`.
pub fn pem_decode(pem: &str, label: &str) -> Option<Vec<u8>> {
    let begin = format!("-----BEGIN {label}-----");
    let end = format!("-----END {label}-----");
    let start = pem.find(&begin)? + begin.len();
    let stop = start + pem.get(start..)?.find(&end)?;
    let body: String = pem.get(start..stop)?.split_whitespace().collect();
    STANDARD.decode(body).ok()
}

/// A JWS whose signature verified against a trusted key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedJws {
    pub header: Header,
    /// The payload bytes exactly as signed.
    pub payload: Vec<u8>,
}

/// Public keys trusted to sign, by key id. Keys come only from here: a key
/// named inside a message is never used.
#[derive(Debug, Clone, Default)]
pub struct TrustStore {
    keys: BTreeMap<String, [u8; 32]>,
}

impl TrustStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a raw Ed25519 public key; returns its key id.
    pub fn add(&mut self, public_key: [u8; 32]) -> String {
        let kid = jwk_thumbprint(&public_key);
        self.keys.insert(kid.clone(), public_key);
        kid
    }

    /// Adds a PEM `PUBLIC KEY`; returns its key id.
    pub fn add_pem(&mut self, pem: &str) -> Result<String, JwsError> {
        let key =
            public_key_from_pem(pem).ok_or(JwsError::Malformed("not an Ed25519 PEM PUBLIC KEY"))?;
        Ok(self.add(key))
    }

    pub fn contains(&self, kid: &str) -> bool {
        self.keys.contains_key(kid)
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Verifies a compact JWS of type `typ`. Checks, in order: size, shape,
    /// header (strict JSON, `alg` = EdDSA, `typ`), key id in this store,
    /// signature. Nothing of the payload is interpreted here.
    pub fn verify_compact(
        &self,
        msg: &[u8],
        typ: &str,
        max_len: usize,
    ) -> Result<VerifiedJws, JwsError> {
        if msg.len() > max_len {
            return Err(JwsError::TooLarge {
                len: msg.len(),
                limit: max_len,
            });
        }
        let text = std::str::from_utf8(msg).map_err(|_| JwsError::Malformed("not ASCII"))?;
        let mut parts = text.split('.');
        let (Some(h64), Some(p64), Some(s64), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(JwsError::Malformed("expected three dot-separated parts"));
        };
        let header_bytes = URL_SAFE_NO_PAD
            .decode(h64)
            .map_err(|_| JwsError::Malformed("header is not base64url"))?;
        let header: Header = serde_json::from_slice(&header_bytes)
            .map_err(|e| JwsError::BadHeader(e.to_string()))?;
        if header.alg != "EdDSA" {
            return Err(JwsError::BadAlgorithm(header.alg));
        }
        if header.typ != typ {
            return Err(JwsError::WrongType {
                expected: typ.into(),
                found: header.typ,
            });
        }
        let key = self
            .keys
            .get(&header.kid)
            .ok_or_else(|| JwsError::UnknownKey(header.kid.clone()))?;
        let sig = URL_SAFE_NO_PAD
            .decode(s64)
            .map_err(|_| JwsError::Malformed("signature is not base64url"))?;
        let signed_len = h64.len() + 1 + p64.len();
        let signed = text
            .get(..signed_len)
            .ok_or(JwsError::Malformed("truncated"))?;
        UnparsedPublicKey::new(&signature::ED25519, key)
            .verify(signed.as_bytes(), &sig)
            .map_err(|_| JwsError::BadSignature)?;
        let payload = URL_SAFE_NO_PAD
            .decode(p64)
            .map_err(|_| JwsError::Malformed("payload is not base64url"))?;
        Ok(VerifiedJws { header, payload })
    }
}

/// SHA-256 of `data`.
pub fn sha256(data: &[u8]) -> [u8; 32] {
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, data);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// base64url without padding.
pub fn b64url(data: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(data)
}

/// Decodes base64url without padding.
pub fn b64url_decode(s: &str) -> Option<Vec<u8>> {
    URL_SAFE_NO_PAD.decode(s).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> SigningKey {
        SigningKey::from_seed(&[7u8; 32]).unwrap()
    }

    #[test]
    fn signed_message_verifies_and_round_trips_payload() {
        let k = key();
        let mut trust = TrustStore::new();
        assert_eq!(trust.add(k.public_key()), k.kid());
        let msg = k.sign_compact("t+jws", b"{\"a\":1}");
        let v = trust
            .verify_compact(msg.as_bytes(), "t+jws", 1 << 20)
            .unwrap();
        assert_eq!(v.payload, b"{\"a\":1}");
        assert_eq!(v.header.kid, k.kid());
    }

    #[test]
    fn every_refusal_has_its_code() {
        let k = key();
        let mut trust = TrustStore::new();
        trust.add(k.public_key());
        let msg = k.sign_compact("t+jws", b"{}");
        let check = |m: &[u8]| trust.verify_compact(m, "t+jws", 1000).unwrap_err().code();
        assert_eq!(check(&vec![b'a'; 1001]), "too_large");
        assert_eq!(check(b"a.b"), "malformed");
        assert_eq!(check(b"a.b.c.d"), "malformed");
        assert_eq!(check(&[0xff, b'.', b'.']), "malformed");
        // Flip one payload character: the signature no longer matches.
        let mut parts: Vec<String> = msg.split('.').map(String::from).collect();
        parts[1] = b64url(b"{ }");
        assert_eq!(check(parts.join(".").as_bytes()), "bad_signature");
        // alg none
        let none_header = b64url(br#"{"alg":"none","kid":"x","typ":"t+jws"}"#);
        assert_eq!(
            check(format!("{none_header}.{}.", b64url(b"{}")).as_bytes()),
            "bad_algorithm"
        );
        // extra header field (e.g. jku) is refused by the strict header parse
        let jku = b64url(br#"{"alg":"EdDSA","kid":"x","typ":"t+jws","jku":"http://x"}"#);
        assert_eq!(check(format!("{jku}.e30.AA").as_bytes()), "bad_header");
        // another key
        let other = SigningKey::from_seed(&[8u8; 32]).unwrap();
        assert_eq!(
            check(other.sign_compact("t+jws", b"{}").as_bytes()),
            "unknown_key"
        );
        // wrong typ
        assert_eq!(
            check(k.sign_compact("other", b"{}").as_bytes()),
            "wrong_type"
        );
    }

    #[test]
    fn public_key_pem_round_trips() {
        let k = key();
        let pem = k.public_key_pem();
        assert!(pem.starts_with("-----BEGIN PUBLIC KEY-----\n"));
        assert_eq!(public_key_from_pem(&pem), Some(k.public_key()));
    }

    #[test]
    fn rfc8037_test_vector_signature() {
        // RFC 8037 appendix A.1 / A.4: the same key and input give the same signature.
        let seed: [u8; 32] = b64url_decode("nWGxne_9WmC6hEr0kuwsxERJxWl7MmkZcDusAxyuf2A")
            .unwrap()
            .try_into()
            .unwrap();
        let k = SigningKey::from_seed(&seed).unwrap();
        assert_eq!(
            b64url(&k.public_key()),
            "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"
        );
        assert_eq!(k.kid(), "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k");
        let sig = k
            .pair
            .sign(b"eyJhbGciOiJFZERTQSJ9.RXhhbXBsZSBvZiBFZDI1NTE5IHNpZ25pbmc");
        assert_eq!(
            b64url(sig.as_ref()),
            "hgyY0il_MGCjP0JzlnLWG1PPOt7-09PGcvMg3AIbQR6dWbhijcNR4ki4iylGjg5BhVsPt9g7sVvpAr_MuM0KAg"
        );
    }
}
