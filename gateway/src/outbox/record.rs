//! One stored record: header, body (a signed message), and either an
//! integrity check or AES-256-GCM encryption, both bound to the record's
//! position (outbox id and sequence number) so records cannot be swapped,
//! moved between outboxes, or altered without detection.
//!
//! ```text
//! header (22 bytes): "TWOB" | version u8 = 1 | flags u8 (bit 0: encrypted)
//!                    | created_ms u64 BE | points u32 BE | body_len u32 BE
//! plain:     header | body | check[16]      check = SHA-256(AAD | header | body)[..16]
//! encrypted: header | nonce[12] | ciphertext | tag[16]   AES-256-GCM, associated data AAD | header
//! AAD = "twin-outbox-v1" | outbox id [16] | seq u64 BE
//! ```

use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};

const MAGIC: &[u8; 4] = b"TWOB";
const VERSION: u8 = 1;
const HEADER_LEN: usize = 22;
const CHECK_LEN: usize = 16;
const TAG_LEN: usize = 16;
const FLAG_ENCRYPTED: u8 = 1;

/// Why a stored record was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    #[error("record is truncated")]
    Truncated,
    #[error("record header is not valid")]
    BadHeader,
    #[error("record integrity check failed (altered, or stored at another position)")]
    Check,
    #[error("record does not decrypt (altered, moved, or another key)")]
    Decrypt,
    #[error("record is encrypted but no key is configured, or plain while a key is configured")]
    Mode,
}

/// An AES-256-GCM key for records at rest.
pub struct Cipher(LessSafeKey);

impl std::fmt::Debug for Cipher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Cipher(..)")
    }
}

impl Cipher {
    pub fn new(key: &[u8; 32]) -> Self {
        Cipher(LessSafeKey::new(
            UnboundKey::new(&AES_256_GCM, key).expect("a 32-byte key fits AES-256"),
        ))
    }

    /// Parses a key file's content: 64 hex characters (whitespace ignored).
    pub fn from_hex(text: &str) -> Option<Self> {
        let hex: String = text.split_whitespace().collect();
        if hex.len() != 64 {
            return None;
        }
        let mut key = [0u8; 32];
        for (i, b) in key.iter_mut().enumerate() {
            *b = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
        }
        Some(Cipher::new(&key))
    }
}

/// What a record says about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decoded {
    pub created_ms: u64,
    pub points: u32,
    pub body: Vec<u8>,
}

fn aad(outbox_id: &[u8; 16], seq: u64, header: &[u8]) -> Vec<u8> {
    let mut a = Vec::with_capacity(14 + 16 + 8 + header.len());
    a.extend_from_slice(b"twin-outbox-v1");
    a.extend_from_slice(outbox_id);
    a.extend_from_slice(&seq.to_be_bytes());
    a.extend_from_slice(header);
    a
}

fn header(flags: u8, created_ms: u64, points: u32, body_len: usize) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[..4].copy_from_slice(MAGIC);
    h[4] = VERSION;
    h[5] = flags;
    h[6..14].copy_from_slice(&created_ms.to_be_bytes());
    h[14..18].copy_from_slice(&points.to_be_bytes());
    h[18..22].copy_from_slice(&(body_len as u32).to_be_bytes());
    h
}

/// Encodes a record for position `seq` of outbox `outbox_id`.
pub fn encode(
    outbox_id: &[u8; 16],
    seq: u64,
    created_ms: u64,
    points: u32,
    body: &[u8],
    cipher: Option<&Cipher>,
) -> Vec<u8> {
    match cipher {
        None => {
            let h = header(0, created_ms, points, body.len());
            let mut out = Vec::with_capacity(HEADER_LEN + body.len() + CHECK_LEN);
            out.extend_from_slice(&h);
            out.extend_from_slice(body);
            let mut hashed = aad(outbox_id, seq, &h);
            hashed.extend_from_slice(body);
            out.extend_from_slice(&twin_model::jws::sha256(&hashed)[..CHECK_LEN]);
            out
        }
        Some(c) => {
            let h = header(FLAG_ENCRYPTED, created_ms, points, body.len());
            let mut nonce = [0u8; NONCE_LEN];
            aws_lc_rs::rand::fill(&mut nonce).expect("the system random generator works");
            let mut sealed = body.to_vec();
            let tag =
                c.0.seal_in_place_separate_tag(
                    Nonce::assume_unique_for_key(nonce),
                    Aad::from(aad(outbox_id, seq, &h)),
                    &mut sealed,
                )
                .expect("AES-GCM sealing of a bounded record succeeds");
            let mut out = Vec::with_capacity(HEADER_LEN + NONCE_LEN + sealed.len() + TAG_LEN);
            out.extend_from_slice(&h);
            out.extend_from_slice(&nonce);
            out.extend_from_slice(&sealed);
            out.extend_from_slice(tag.as_ref());
            out
        }
    }
}

/// Decodes and checks a record read from position `seq`.
pub fn decode(
    outbox_id: &[u8; 16],
    seq: u64,
    bytes: &[u8],
    cipher: Option<&Cipher>,
) -> Result<Decoded, RecordError> {
    let h = bytes.get(..HEADER_LEN).ok_or(RecordError::Truncated)?;
    if h.get(..4) != Some(&MAGIC[..]) || h[4] != VERSION {
        return Err(RecordError::BadHeader);
    }
    let flags = h[5];
    let created_ms = u64::from_be_bytes(h[6..14].try_into().map_err(|_| RecordError::BadHeader)?);
    let points = u32::from_be_bytes(h[14..18].try_into().map_err(|_| RecordError::BadHeader)?);
    let body_len =
        u32::from_be_bytes(h[18..22].try_into().map_err(|_| RecordError::BadHeader)?) as usize;
    let rest = &bytes[HEADER_LEN..];
    match (flags, cipher) {
        (0, None) => {
            if rest.len() != body_len + CHECK_LEN {
                return Err(RecordError::Truncated);
            }
            let (body, check) = rest.split_at(body_len);
            let mut hashed = aad(outbox_id, seq, h);
            hashed.extend_from_slice(body);
            if twin_model::jws::sha256(&hashed)[..CHECK_LEN] != *check {
                return Err(RecordError::Check);
            }
            Ok(Decoded {
                created_ms,
                points,
                body: body.to_vec(),
            })
        }
        (FLAG_ENCRYPTED, Some(c)) => {
            if rest.len() != NONCE_LEN + body_len + TAG_LEN {
                return Err(RecordError::Truncated);
            }
            let (nonce, sealed) = rest.split_at(NONCE_LEN);
            let nonce: [u8; NONCE_LEN] = nonce.try_into().map_err(|_| RecordError::Truncated)?;
            let mut buf = sealed.to_vec();
            let plain =
                c.0.open_in_place(
                    Nonce::assume_unique_for_key(nonce),
                    Aad::from(aad(outbox_id, seq, h)),
                    &mut buf,
                )
                .map_err(|_| RecordError::Decrypt)?;
            Ok(Decoded {
                created_ms,
                points,
                body: plain.to_vec(),
            })
        }
        (0 | FLAG_ENCRYPTED, _) => Err(RecordError::Mode),
        _ => Err(RecordError::BadHeader),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: [u8; 16] = [7; 16];

    #[test]
    fn plain_and_encrypted_records_round_trip() {
        let c = Cipher::new(&[9; 32]);
        for cipher in [None, Some(&c)] {
            let r = encode(&ID, 5, 1234, 16, b"eyJ.body.sig", cipher);
            let d = decode(&ID, 5, &r, cipher).unwrap();
            assert_eq!(
                d,
                Decoded {
                    created_ms: 1234,
                    points: 16,
                    body: b"eyJ.body.sig".to_vec()
                }
            );
        }
        let r = encode(&ID, 5, 1, 1, b"secret-batch", Some(&c));
        assert!(
            !r.windows(12).any(|w| w == b"secret-batch"),
            "encrypted at rest"
        );
    }

    #[test]
    fn altered_moved_truncated_or_foreign_records_are_refused() {
        let c = Cipher::new(&[9; 32]);
        for cipher in [None, Some(&c)] {
            let r = encode(&ID, 5, 1234, 16, b"eyJ.body.sig", cipher);
            for i in 0..r.len() {
                let mut bad = r.clone();
                bad[i] ^= 0x01;
                assert!(
                    decode(&ID, 5, &bad, cipher).is_err(),
                    "flip at byte {i} detected"
                );
            }
            assert!(decode(&ID, 6, &r, cipher).is_err(), "moved to another seq");
            assert!(
                decode(&[8; 16], 5, &r, cipher).is_err(),
                "moved to another outbox"
            );
            assert_eq!(
                decode(&ID, 5, &r[..r.len() - 1], cipher),
                Err(RecordError::Truncated)
            );
            assert_eq!(
                decode(&ID, 5, &r[..10], cipher),
                Err(RecordError::Truncated)
            );
        }
        let r = encode(&ID, 5, 1, 1, b"x", Some(&c));
        assert_eq!(
            decode(&ID, 5, &r, Some(&Cipher::new(&[1; 32]))),
            Err(RecordError::Decrypt)
        );
        assert_eq!(decode(&ID, 5, &r, None), Err(RecordError::Mode));
    }

    #[test]
    fn key_files_are_64_hex_characters() {
        assert!(Cipher::from_hex(&"ab".repeat(32)).is_some());
        assert!(Cipher::from_hex("ab").is_none());
        assert!(Cipher::from_hex(&"zz".repeat(32)).is_none());
    }
}
