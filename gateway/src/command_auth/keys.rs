//! Operator keys: the trust store of public keys the gateway accepts, and
//! the private keys the operator tool (and the tests) sign with.
//!
//! Every key has exactly one algorithm, fixed by its type: Ed25519 keys
//! sign `EdDSA`, P-256 keys sign `ES256`. A key id is the RFC 7638 JWK
//! thumbprint of the public key, so anyone holding the public key can
//! compute the `kid` to put in a header.

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{
    self, EcdsaKeyPair, Ed25519KeyPair, KeyPair, ParsedPublicKey, ECDSA_P256_SHA256_FIXED_SIGNING,
};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use twin_model::jws::{b64url, pem_decode, pem_encode};

/// DER prefix of an Ed25519 SubjectPublicKeyInfo (RFC 8410); 32 key bytes follow.
const ED25519_SPKI_PREFIX: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];
/// DER prefix of a P-256 SubjectPublicKeyInfo (RFC 5480, id-ecPublicKey +
/// prime256v1); the 65-byte uncompressed point (`04 || X || Y`) follows.
const P256_SPKI_PREFIX: [u8; 26] = [
    0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a,
    0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
];

/// The one signature algorithm a key is pinned to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Algorithm {
    /// Ed25519 (RFC 8037).
    EdDSA,
    /// ECDSA P-256 with SHA-256, signature `r || s` (64 bytes, RFC 7518 §3.4).
    ES256,
}

impl Algorithm {
    /// The JOSE `alg` name.
    pub fn as_str(self) -> &'static str {
        match self {
            Algorithm::EdDSA => "EdDSA",
            Algorithm::ES256 => "ES256",
        }
    }
}

impl std::fmt::Display for Algorithm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {why}")]
    File { path: PathBuf, why: String },
    #[error("no PEM `{0}` block")]
    NoPem(&'static str),
    #[error("not an Ed25519 or P-256 public key (SubjectPublicKeyInfo)")]
    UnsupportedPublicKey,
    #[error("not an Ed25519 or P-256 PKCS#8 private key")]
    UnsupportedPrivateKey,
    #[error("the key is not valid: {0}")]
    Rejected(String),
    #[error("the key could not be generated")]
    Generate,
}

/// A trusted operator public key with its pinned algorithm.
#[derive(Clone)]
pub struct TrustedKey {
    kid: String,
    alg: Algorithm,
    key: ParsedPublicKey,
    /// Where the key was loaded from, for logs.
    source: String,
}

impl std::fmt::Debug for TrustedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrustedKey")
            .field("kid", &self.kid)
            .field("alg", &self.alg)
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

impl TrustedKey {
    /// From a PEM `PUBLIC KEY` (SubjectPublicKeyInfo) of an Ed25519 or
    /// P-256 key.
    pub fn from_pem(pem: &str, source: impl Into<String>) -> Result<Self, KeyError> {
        let der = pem_decode(pem, "PUBLIC KEY").ok_or(KeyError::NoPem("PUBLIC KEY"))?;
        let (alg, raw) = if let Some(raw) = der.strip_prefix(&ED25519_SPKI_PREFIX[..]) {
            (Algorithm::EdDSA, raw)
        } else if let Some(raw) = der.strip_prefix(&P256_SPKI_PREFIX[..]) {
            (Algorithm::ES256, raw)
        } else {
            return Err(KeyError::UnsupportedPublicKey);
        };
        Self::from_raw(alg, raw, source)
    }

    /// From raw public key bytes: 32 bytes for Ed25519, the 65-byte
    /// uncompressed point for P-256. The key is checked here (a P-256
    /// point must be on the curve), not at the first verification.
    pub fn from_raw(
        alg: Algorithm,
        raw: &[u8],
        source: impl Into<String>,
    ) -> Result<Self, KeyError> {
        let (verify_alg, len): (&'static dyn signature::VerificationAlgorithm, usize) = match alg {
            Algorithm::EdDSA => (&signature::ED25519, 32),
            Algorithm::ES256 => (&signature::ECDSA_P256_SHA256_FIXED, 65),
        };
        if raw.len() != len {
            return Err(KeyError::UnsupportedPublicKey);
        }
        let key =
            ParsedPublicKey::new(verify_alg, raw).map_err(|e| KeyError::Rejected(e.to_string()))?;
        Ok(TrustedKey {
            kid: thumbprint(alg, raw)?,
            alg,
            key,
            source: source.into(),
        })
    }

    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The one algorithm this key verifies.
    pub fn algorithm(&self) -> Algorithm {
        self.alg
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    /// Verifies `signature` over `message` with the pinned algorithm.
    pub(crate) fn verify(&self, message: &[u8], signature: &[u8]) -> bool {
        self.key.verify_sig(message, signature).is_ok()
    }
}

/// RFC 7638 thumbprint of a raw public key.
fn thumbprint(alg: Algorithm, raw: &[u8]) -> Result<String, KeyError> {
    let jwk = match alg {
        Algorithm::EdDSA => format!(r#"{{"crv":"Ed25519","kty":"OKP","x":"{}"}}"#, b64url(raw)),
        Algorithm::ES256 => {
            let (x, y) = raw
                .get(1..33)
                .zip(raw.get(33..65))
                .ok_or(KeyError::UnsupportedPublicKey)?;
            format!(
                r#"{{"crv":"P-256","kty":"EC","x":"{}","y":"{}"}}"#,
                b64url(x),
                b64url(y)
            )
        }
    };
    Ok(b64url(&twin_model::jws::sha256(jwk.as_bytes())))
}

/// The operator public keys this gateway trusts, by key id. Keys come only
/// from here: a key or key URL named inside a token is never used.
#[derive(Debug, Clone, Default)]
pub struct OperatorTrustStore {
    keys: BTreeMap<String, TrustedKey>,
}

impl OperatorTrustStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a key; returns its key id.
    pub fn add(&mut self, key: TrustedKey) -> String {
        let kid = key.kid.clone();
        self.keys.insert(kid.clone(), key);
        kid
    }

    /// Adds a PEM `PUBLIC KEY`; returns its key id.
    pub fn add_pem(&mut self, pem: &str, source: &str) -> Result<String, KeyError> {
        Ok(self.add(TrustedKey::from_pem(pem, source)?))
    }

    /// Loads one PEM file holding one public key.
    pub fn add_file(&mut self, path: &Path) -> Result<String, KeyError> {
        let pem = std::fs::read_to_string(path).map_err(|source| KeyError::Io {
            path: path.into(),
            source,
        })?;
        self.add_pem(&pem, &path.display().to_string())
            .map_err(|e| KeyError::File {
                path: path.into(),
                why: e.to_string(),
            })
    }

    /// Loads every `*.pem` file of `dir` (one public key per file), in
    /// name order. Any file that is not a usable key is an error: a trust
    /// store is loaded completely or not at all.
    pub fn load_dir(dir: &Path) -> Result<Self, KeyError> {
        let io = |source| KeyError::Io {
            path: dir.into(),
            source,
        };
        let mut paths = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(io)? {
            let path = entry.map_err(io)?.path();
            if path.extension().is_some_and(|e| e == "pem") {
                paths.push(path);
            }
        }
        paths.sort();
        let mut store = Self::new();
        for path in paths {
            store.add_file(&path)?;
        }
        Ok(store)
    }

    pub fn get(&self, kid: &str) -> Option<&TrustedKey> {
        self.keys.get(kid)
    }

    /// Every trusted key, by key id.
    pub fn keys(&self) -> impl Iterator<Item = &TrustedKey> {
        self.keys.values()
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

enum Pair {
    Ed25519(Ed25519KeyPair),
    P256(EcdsaKeyPair),
}

/// An operator's private signing key (Ed25519 or P-256), for the operator
/// tool and the tests.
pub struct OperatorKey {
    pair: Pair,
    kid: String,
}

impl std::fmt::Debug for OperatorKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OperatorKey")
            .field("kid", &self.kid)
            .field("alg", &self.algorithm())
            .finish_non_exhaustive()
    }
}

impl OperatorKey {
    /// A new key of the given algorithm, as PKCS#8 PEM (`PRIVATE KEY`).
    pub fn generate_pem(alg: Algorithm) -> Result<String, KeyError> {
        let rng = SystemRandom::new();
        let doc = match alg {
            Algorithm::EdDSA => Ed25519KeyPair::generate_pkcs8(&rng),
            Algorithm::ES256 => {
                EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
            }
        }
        .map_err(|_| KeyError::Generate)?;
        Ok(pem_encode("PRIVATE KEY", doc.as_ref()))
    }

    /// A new key of the given algorithm.
    pub fn generate(alg: Algorithm) -> Result<Self, KeyError> {
        Self::from_pkcs8_pem(&Self::generate_pem(alg)?)
    }

    /// From a PEM `PRIVATE KEY` block (PKCS#8) of an Ed25519 or P-256 key,
    /// such as `gateway::pki::new_signing_key_pem()` writes.
    pub fn from_pkcs8_pem(pem: &str) -> Result<Self, KeyError> {
        let der = pem_decode(pem, "PRIVATE KEY").ok_or(KeyError::NoPem("PRIVATE KEY"))?;
        Self::from_pkcs8_der(&der)
    }

    /// From a PKCS#8 DER document (v1 or v2 for Ed25519, v1 for P-256).
    pub fn from_pkcs8_der(der: &[u8]) -> Result<Self, KeyError> {
        let (pair, alg, public) = if let Ok(p) = Ed25519KeyPair::from_pkcs8_maybe_unchecked(der) {
            let public = p.public_key().as_ref().to_vec();
            (Pair::Ed25519(p), Algorithm::EdDSA, public)
        } else if let Ok(p) = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, der) {
            let public = p.public_key().as_ref().to_vec();
            (Pair::P256(p), Algorithm::ES256, public)
        } else {
            return Err(KeyError::UnsupportedPrivateKey);
        };
        Ok(OperatorKey {
            kid: thumbprint(alg, &public)?,
            pair,
        })
    }

    pub fn kid(&self) -> &str {
        &self.kid
    }

    pub fn algorithm(&self) -> Algorithm {
        match self.pair {
            Pair::Ed25519(_) => Algorithm::EdDSA,
            Pair::P256(_) => Algorithm::ES256,
        }
    }

    /// The raw public key: 32 bytes (Ed25519) or the 65-byte uncompressed point (P-256).
    pub fn public_key(&self) -> Vec<u8> {
        match &self.pair {
            Pair::Ed25519(p) => p.public_key().as_ref().to_vec(),
            Pair::P256(p) => p.public_key().as_ref().to_vec(),
        }
    }

    /// The public key as a PEM `PUBLIC KEY` (SubjectPublicKeyInfo), the
    /// form the trust store loads.
    pub fn public_key_pem(&self) -> String {
        let prefix: &[u8] = match self.pair {
            Pair::Ed25519(_) => &ED25519_SPKI_PREFIX,
            Pair::P256(_) => &P256_SPKI_PREFIX,
        };
        let mut der = prefix.to_vec();
        der.extend_from_slice(&self.public_key());
        pem_encode("PUBLIC KEY", &der)
    }

    /// The public half, ready for a trust store.
    pub fn trusted(&self) -> TrustedKey {
        TrustedKey::from_raw(self.algorithm(), &self.public_key(), "operator key")
            .expect("the public half of a valid key pair is a valid public key")
    }

    /// Signs `message` (a JWS signing input) with the key's algorithm:
    /// 64 bytes, `r || s` for ES256.
    pub fn sign(&self, message: &[u8]) -> Vec<u8> {
        match &self.pair {
            Pair::Ed25519(p) => p.sign(message).as_ref().to_vec(),
            Pair::P256(p) => p
                .sign(&SystemRandom::new(), message)
                .expect("ECDSA signing with a valid key only fails if the system RNG fails")
                .as_ref()
                .to_vec(),
        }
    }
}
