//! Standard Webhooks signatures: signing, verifying and making keys.
//!
//! The signed content is `{webhook-id}.{webhook-timestamp}.{raw body}`. Two
//! schemes are understood, each named by its prefix in `webhook-signature`:
//! `v1` is HMAC-SHA256 under a shared `whsec_` secret, `v1a` is Ed25519 checked
//! with a `whpk_` public key (the producer signs with the matching `whsk_`
//! secret key). A header may carry several space-separated signatures and a
//! source may have several keys (rotation): one valid pair is enough.
//!
//! Verification works on the raw bytes, never on parsed JSON, computes each
//! HMAC key's MAC once and compares it with every `v1` entry in constant time
//! (`CtOutput`); Ed25519 verification involves no secret. A header with more
//! than [`MAX_SIGNATURES`] entries is refused before any hashing. The ingress and the `conveyor webhook` CLI both use this module, so
//! what the CLI signs is exactly what the ingress accepts.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use ed25519_dalek::{Signature, Signer, Verifier};
use hmac::digest::CtOutput;
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Prefix of a shared HMAC secret.
pub const HMAC_PREFIX: &str = "whsec_";
/// Prefix of an Ed25519 public (verifying) key.
pub const PUBLIC_PREFIX: &str = "whpk_";
/// Prefix of an Ed25519 secret (signing) key: the 32-byte seed.
pub const SECRET_PREFIX: &str = "whsk_";

/// A key that checks signatures, as configured for a source.
#[derive(Clone)]
pub enum VerifyingKey {
    /// `whsec_…`: checks `v1` signatures.
    Hmac(Vec<u8>),
    /// `whpk_…`: checks `v1a` signatures.
    Ed25519(ed25519_dalek::VerifyingKey),
}

/// A key that makes signatures (the producer's side, and the CLI).
pub enum SigningKey {
    /// `whsec_…`: makes `v1` signatures.
    Hmac(Vec<u8>),
    /// `whsk_…`: makes `v1a` signatures.
    Ed25519(ed25519_dalek::SigningKey),
}

/// A key string that cannot be used; the message never contains the key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// The prefix is not one this module knows.
    #[error("a key must start with `whsec_` or `whpk_` (`whsk_` for signing)")]
    UnknownPrefix,
    /// The part after the prefix is not standard base64.
    #[error("the key is not valid base64 after its prefix")]
    Base64,
    /// Wrong length or not a valid curve point.
    #[error("{0}")]
    Invalid(&'static str),
}

impl std::fmt::Debug for VerifyingKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Hmac(_) => f.write_str("VerifyingKey::Hmac(<redacted>)"),
            Self::Ed25519(key) => write!(f, "VerifyingKey::Ed25519({})", public_key_string(key)),
        }
    }
}

fn decode(rest: &str) -> Result<Vec<u8>, KeyError> {
    STANDARD.decode(rest.trim()).map_err(|_| KeyError::Base64)
}

fn hmac_secret(rest: &str) -> Result<Vec<u8>, KeyError> {
    let secret = decode(rest)?;
    if secret.len() < 16 {
        return Err(KeyError::Invalid("a whsec_ secret must be 16 to 64 bytes"));
    }
    if secret.len() > 64 {
        return Err(KeyError::Invalid("a whsec_ secret must be 16 to 64 bytes"));
    }
    Ok(secret)
}

fn bytes32(rest: &str, what: &'static str) -> Result<[u8; 32], KeyError> {
    decode(rest)?
        .try_into()
        .map_err(|_| KeyError::Invalid(what))
}

impl VerifyingKey {
    /// Parses `whsec_<base64>` or `whpk_<base64>`.
    pub fn parse(key: &str) -> Result<Self, KeyError> {
        let key = key.trim();
        if let Some(rest) = key.strip_prefix(HMAC_PREFIX) {
            return Ok(Self::Hmac(hmac_secret(rest)?));
        }
        if let Some(rest) = key.strip_prefix(PUBLIC_PREFIX) {
            let bytes = bytes32(rest, "a whpk_ key must be 32 bytes")?;
            let key = ed25519_dalek::VerifyingKey::from_bytes(&bytes)
                .map_err(|_| KeyError::Invalid("a whpk_ key is not a valid Ed25519 public key"))?;
            return Ok(Self::Ed25519(key));
        }
        if key.starts_with(SECRET_PREFIX) {
            return Err(KeyError::Invalid(
                "a whsk_ key is a producer's secret: configure its whpk_ public key instead",
            ));
        }
        Err(KeyError::UnknownPrefix)
    }
}

impl SigningKey {
    /// Parses `whsec_<base64>` or `whsk_<base64 of the 32-byte seed>`.
    pub fn parse(key: &str) -> Result<Self, KeyError> {
        let key = key.trim();
        if let Some(rest) = key.strip_prefix(HMAC_PREFIX) {
            return Ok(Self::Hmac(hmac_secret(rest)?));
        }
        if let Some(rest) = key.strip_prefix(SECRET_PREFIX) {
            let seed = bytes32(rest, "a whsk_ key must be 32 bytes")?;
            return Ok(Self::Ed25519(ed25519_dalek::SigningKey::from_bytes(&seed)));
        }
        if key.starts_with(PUBLIC_PREFIX) {
            return Err(KeyError::Invalid(
                "a whpk_ key can only verify; signing needs the whsk_ secret key",
            ));
        }
        Err(KeyError::UnknownPrefix)
    }

    /// `v1,<base64>` or `v1a,<base64>` over `{id}.{timestamp}.{body}`.
    pub fn sign(&self, id: &str, timestamp: i64, body: &[u8]) -> String {
        let content = signed_content(id, timestamp, body);
        match self {
            Self::Hmac(secret) => format!("v1,{}", STANDARD.encode(hmac_of(secret, &content))),
            Self::Ed25519(key) => {
                format!("v1a,{}", STANDARD.encode(key.sign(&content).to_bytes()))
            }
        }
    }
}

/// Bytes in an HMAC-SHA256 tag.
const MAC_LEN: usize = 32;

fn hmac_of(secret: &[u8], content: &[u8]) -> [u8; MAC_LEN] {
    mac_of(secret, content).into_bytes().into()
}

fn mac_of(secret: &[u8], content: &[u8]) -> CtOutput<Hmac<Sha256>> {
    #[cfg(test)]
    tests::MACS_COMPUTED.with(|n| n.set(n.get() + 1));
    let mut mac = new_mac(secret);
    mac.update(content);
    mac.finalize()
}

fn new_mac(secret: &[u8]) -> Hmac<Sha256> {
    // HMAC takes keys of any length; this cannot fail.
    <Hmac<Sha256> as Mac>::new_from_slice(secret).unwrap_or_else(|_| unreachable!())
}

/// The bytes every signature covers.
pub fn signed_content(id: &str, timestamp: i64, body: &[u8]) -> Vec<u8> {
    let mut content = Vec::with_capacity(id.len() + body.len() + 24);
    content.extend_from_slice(id.as_bytes());
    content.push(b'.');
    content.extend_from_slice(timestamp.to_string().as_bytes());
    content.push(b'.');
    content.extend_from_slice(body);
    content
}

/// Most entries one `webhook-signature` header may carry. Each `v1a` entry
/// costs an Ed25519 verification per key, so an unbounded list would let anyone
/// make the ingress burn CPU; a real producer sends one, or two during a rotation.
pub const MAX_SIGNATURES: usize = 10;

/// A `webhook-signature` header with more than [`MAX_SIGNATURES`] entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("`webhook-signature` carries {found} signatures; at most {MAX_SIGNATURES} are accepted")]
pub struct TooManySignatures {
    /// How many entries the header had.
    pub found: usize,
}

/// The space-separated entries of a `webhook-signature` header, empty ones skipped.
pub fn signature_entries(header: &str) -> impl Iterator<Item = &str> {
    header.split(' ').filter(|entry| !entry.is_empty())
}

/// Whether `header` has at most [`MAX_SIGNATURES`] entries.
pub fn check_signature_count(header: &str) -> Result<(), TooManySignatures> {
    let found = signature_entries(header).count();
    if found > MAX_SIGNATURES {
        return Err(TooManySignatures { found });
    }
    Ok(())
}

/// Whether any signature in `header` (space-separated `version,base64`
/// entries) is valid for the content under any of `keys`: `Ok(true)` when one
/// is, `Ok(false)` when none is, and an error, before any hashing, when the
/// header has more than [`MAX_SIGNATURES`] entries. Entries of unknown
/// versions or bad base64 are ignored.
///
/// Each HMAC key's MAC is computed once and compared with every `v1` entry in
/// constant time; every pair is compared (no early exit), so the time taken
/// says nothing about which entry or key matched.
pub fn verify(
    keys: &[VerifyingKey],
    id: &str,
    timestamp: i64,
    body: &[u8],
    header: &str,
) -> Result<bool, TooManySignatures> {
    check_signature_count(header)?;
    let content = signed_content(id, timestamp, body);
    let macs: Vec<CtOutput<Hmac<Sha256>>> = keys
        .iter()
        .filter_map(|key| match key {
            VerifyingKey::Hmac(secret) => Some(mac_of(secret, &content)),
            VerifyingKey::Ed25519(_) => None,
        })
        .collect();
    let mut valid = false;
    for entry in signature_entries(header) {
        let Some((version, encoded)) = entry.split_once(',') else {
            continue;
        };
        let Ok(signature) = STANDARD.decode(encoded) else {
            continue;
        };
        match version {
            "v1" if signature.len() == MAC_LEN => {
                let presented = CtOutput::<Hmac<Sha256>>::new(
                    hmac::digest::Output::<Hmac<Sha256>>::clone_from_slice(&signature),
                );
                for mac in &macs {
                    valid |= *mac == presented;
                }
            }
            "v1a" => {
                let Ok(signature) = Signature::from_slice(&signature) else {
                    continue;
                };
                for key in keys {
                    if let VerifyingKey::Ed25519(public) = key {
                        valid |= public.verify(&content, &signature).is_ok();
                    }
                }
            }
            _ => {}
        }
    }
    Ok(valid)
}

/// Whether `timestamp` (Unix seconds) is within `tolerance_secs` of `now`, either way.
pub fn timestamp_is_fresh(timestamp: i64, now: i64, tolerance_secs: u64) -> bool {
    let tolerance = i64::try_from(tolerance_secs).unwrap_or(i64::MAX);
    now.saturating_sub(timestamp).abs() <= tolerance
}

/// A new `whsec_` secret of 32 random bytes.
pub fn generate_hmac_secret() -> String {
    let bytes: [u8; 32] = rand::random();
    format!("{HMAC_PREFIX}{}", STANDARD.encode(bytes))
}

/// A new Ed25519 pair: (`whsk_` secret key for the producer, `whpk_` public key for our config).
pub fn generate_ed25519_pair() -> (String, String) {
    let seed: [u8; 32] = rand::random();
    let key = ed25519_dalek::SigningKey::from_bytes(&seed);
    (
        format!("{SECRET_PREFIX}{}", STANDARD.encode(seed)),
        public_key_string(&key.verifying_key()),
    )
}

/// `whpk_<base64>` for `key`.
pub fn public_key_string(key: &ed25519_dalek::VerifyingKey) -> String {
    format!("{PUBLIC_PREFIX}{}", STANDARD.encode(key.as_bytes()))
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use super::*;

    thread_local! {
        /// HMACs computed by [`mac_of`] on this thread.
        pub(super) static MACS_COMPUTED: Cell<usize> = const { Cell::new(0) };
    }

    fn macs_computed_by(run: impl FnOnce()) -> usize {
        MACS_COMPUTED.with(|n| n.set(0));
        run();
        MACS_COMPUTED.with(Cell::get)
    }

    /// [`super::verify`] for headers within the cap.
    fn verify(keys: &[VerifyingKey], id: &str, ts: i64, body: &[u8], header: &str) -> bool {
        super::verify(keys, id, ts, body, header).expect("within the signature cap")
    }

    fn wrong_v1() -> String {
        format!("v1,{}", STANDARD.encode(rand::random::<[u8; 32]>()))
    }

    #[test]
    fn each_hmac_key_is_hashed_once_however_many_entries() {
        let (old, new) = (generate_hmac_secret(), generate_hmac_secret());
        let (_, public) = generate_ed25519_pair();
        let keys = [&old, &new, &public].map(|k| VerifyingKey::parse(k).unwrap());
        let good = SigningKey::parse(&new).unwrap().sign("m", 5, b"x");
        let mut entries: Vec<String> = (0..MAX_SIGNATURES - 1).map(|_| wrong_v1()).collect();
        entries.push(good);
        let header = entries.join(" ");
        let mut valid = false;
        let computed = macs_computed_by(|| valid = verify(&keys, "m", 5, b"x", &header));
        assert!(valid);
        assert_eq!(computed, 2, "one MAC per HMAC key, not per entry × key");
        // A v1 entry of the wrong length is ignored, not a panic.
        assert!(!verify(&keys, "m", 5, b"x", "v1,AAAA v1,"));
    }

    #[test]
    fn more_signatures_than_the_cap_are_refused_before_hashing() {
        let secret = generate_hmac_secret();
        let keys = [VerifyingKey::parse(&secret).unwrap()];
        let good = SigningKey::parse(&secret).unwrap().sign("m", 5, b"x");
        let mut entries: Vec<String> = (0..MAX_SIGNATURES).map(|_| wrong_v1()).collect();
        entries.push(good.clone());
        let header = entries.join(" ");
        let mut outcome = Ok(true);
        let computed = macs_computed_by(|| outcome = super::verify(&keys, "m", 5, b"x", &header));
        assert_eq!(
            outcome,
            Err(TooManySignatures {
                found: MAX_SIGNATURES + 1
            })
        );
        assert_eq!(computed, 0);
        // Exactly the cap is fine, and empty entries (doubled spaces) do not count.
        entries.remove(0);
        assert!(verify(&keys, "m", 5, b"x", &entries.join("  ")));
        assert_eq!(check_signature_count(&entries.join("   ")), Ok(()));
    }

    /// The Standard Webhooks reference libraries' published `v1` vector.
    #[test]
    fn hmac_matches_the_specification_vector() {
        let secret = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD";
        let (id, ts) = ("msg_27UH4WbU6Z5A5EzD8u03UvzRbpk", 1_649_367_553);
        let body = br#"{"email":"test@example.com","username":"test_user"}"#;
        let expected = "v1,tZ1I4/hDygAJgO5TYxiSd6Sd0kDW6hPenDe+bTa3Kkw=";
        assert_eq!(
            SigningKey::parse(secret).unwrap().sign(id, ts, body),
            expected
        );
        let keys = [VerifyingKey::parse(secret).unwrap()];
        assert!(verify(&keys, id, ts, body, expected));
        assert!(!verify(&keys, id, ts + 1, body, expected));
        assert!(!verify(&keys, id, ts, b"{}", expected));
    }

    /// The reference libraries' `v1a` (Ed25519) vector.
    #[test]
    fn ed25519_matches_the_specification_vector() {
        let secret = "whsk_VEVTVFNJR05JTkdLRVlET05PVFVTRVRISVNGT1JBTlk=";
        let (id, ts) = ("msg_p5jXN8AQM9LWM0D4loKWxJek", 1_614_265_330);
        let body = br#"{"test": 2432232314}"#;
        let expected = "v1a,tQ9V2XOqn7jL/DQenEFpqIugdBVtiMmER5mhSkXBNwM0mkATuDe6KYYUuxqtaiHeYGb7KaaBRdM5WqyeFiL8Ag==";
        let SigningKey::Ed25519(signing) = SigningKey::parse(secret).unwrap() else {
            panic!("not an Ed25519 key");
        };
        assert_eq!(
            SigningKey::Ed25519(signing.clone()).sign(id, ts, body),
            expected
        );
        let public = VerifyingKey::parse(&public_key_string(&signing.verifying_key())).unwrap();
        assert!(verify(
            std::slice::from_ref(&public),
            id,
            ts,
            body,
            expected
        ));
        assert!(!verify(
            &[public],
            id,
            ts,
            br#"{"test":2432232314}"#,
            expected
        ));
    }

    #[test]
    fn any_key_and_any_signature_may_match() {
        let old = generate_hmac_secret();
        let (sk, pk) = generate_ed25519_pair();
        let keys = [
            VerifyingKey::parse(&old).unwrap(),
            VerifyingKey::parse(&pk).unwrap(),
        ];
        let v1a = SigningKey::parse(&sk).unwrap().sign("m", 5, b"x");
        let other = SigningKey::parse(&generate_hmac_secret())
            .unwrap()
            .sign("m", 5, b"x");
        assert!(verify(
            &keys,
            "m",
            5,
            b"x",
            &format!("{other} v2,AAAA {v1a}")
        ));
        assert!(!verify(&keys, "m", 5, b"x", &other));
        // A v1a signature is never checked against an HMAC key, and vice versa.
        assert!(!verify(&keys[..1], "m", 5, b"x", &v1a));
        let truncated = &v1a[..v1a.len() - 4];
        assert!(!verify(&keys, "m", 5, b"x", truncated));
    }

    #[test]
    fn keys_are_checked() {
        assert_eq!(
            VerifyingKey::parse("abc").unwrap_err(),
            KeyError::UnknownPrefix
        );
        assert_eq!(
            VerifyingKey::parse("whsec_!!").unwrap_err(),
            KeyError::Base64
        );
        assert!(VerifyingKey::parse("whsec_dG9vLXNob3J0").is_err());
        assert!(VerifyingKey::parse("whpk_AAAA").is_err());
        let (sk, _) = generate_ed25519_pair();
        assert!(VerifyingKey::parse(&sk).is_err());
        assert!(
            !format!(
                "{:?}",
                VerifyingKey::parse(&generate_hmac_secret()).unwrap()
            )
            .contains("whsec")
        );
    }

    #[test]
    fn tolerance_is_inclusive_both_ways() {
        assert!(timestamp_is_fresh(700, 1000, 300));
        assert!(timestamp_is_fresh(1300, 1000, 300));
        assert!(!timestamp_is_fresh(699, 1000, 300));
        assert!(!timestamp_is_fresh(1301, 1000, 300));
    }
}
