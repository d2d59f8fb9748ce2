//! AES-256-GCM with `ring`: sealing PII under a subject's data key, and wrapping data keys
//! under the master key.
//!
//! Sealed format: `01 | key version (u32, big-endian) | nonce (12) | ciphertext | tag (16)`.
//! The associated data binds a ciphertext to its subject and field, so a sealed value moved
//! to another subject or field does not open.

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};

use cdp_schemas::Sealed;

const FORMAT: u8 = 1;
const HEADER: usize = 1 + 4 + NONCE_LEN;
const TAG: usize = 16;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CryptoError {
    #[error("{0} must be 64 hex characters (32 bytes)")]
    BadKeyMaterial(&'static str),
    #[error("the system random generator failed")]
    Random,
    #[error("sealed value is malformed")]
    Malformed,
    #[error("sealed value does not open with this key (wrong key, subject or field, or tampered)")]
    Open,
}

pub(crate) fn random<const N: usize>(rng: &SystemRandom) -> Result<[u8; N], CryptoError> {
    let mut b = [0u8; N];
    rng.fill(&mut b).map_err(|_| CryptoError::Random)?;
    Ok(b)
}

fn seal_raw(
    key: &LessSafeKey,
    rng: &SystemRandom,
    prefix: &[u8],
    aad: &[u8],
    plaintext: &[u8],
) -> Result<Vec<u8>, CryptoError> {
    let nonce_bytes: [u8; NONCE_LEN] = random(rng)?;
    let mut out = Vec::with_capacity(prefix.len() + NONCE_LEN + plaintext.len() + TAG);
    out.extend_from_slice(prefix);
    out.extend_from_slice(&nonce_bytes);
    let start = out.len();
    out.extend_from_slice(plaintext);
    let mut body = out.split_off(start);
    key.seal_in_place_append_tag(
        Nonce::assume_unique_for_key(nonce_bytes),
        Aad::from(aad),
        &mut body,
    )
    .map_err(|_| CryptoError::Random)?;
    out.extend_from_slice(&body);
    Ok(out)
}

fn open_raw(
    key: &LessSafeKey,
    nonce: &[u8],
    aad: &[u8],
    body: &[u8],
) -> Result<Vec<u8>, CryptoError> {
    let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| CryptoError::Malformed)?;
    let mut buf = body.to_vec();
    let plain = key
        .open_in_place(nonce, Aad::from(aad), &mut buf)
        .map_err(|_| CryptoError::Open)?;
    Ok(plain.to_vec())
}

/// The associated data of a PII field: subject and field name.
pub fn field_aad(subject_id: &str, field: &str) -> Vec<u8> {
    let mut aad = Vec::with_capacity(subject_id.len() + field.len() + 1);
    aad.extend_from_slice(subject_id.as_bytes());
    aad.push(0);
    aad.extend_from_slice(field.as_bytes());
    aad
}

/// One version of a subject's data key.
pub struct DataKey {
    version: u32,
    key: LessSafeKey,
}

impl std::fmt::Debug for DataKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DataKey(v{})", self.version)
    }
}

impl DataKey {
    pub(crate) fn from_bytes(version: u32, bytes: &[u8]) -> Result<Self, CryptoError> {
        let key = UnboundKey::new(&AES_256_GCM, bytes)
            .map_err(|_| CryptoError::BadKeyMaterial("data key"))?;
        Ok(Self {
            version,
            key: LessSafeKey::new(key),
        })
    }

    pub fn version(&self) -> u32 {
        self.version
    }

    pub fn seal(
        &self,
        rng: &SystemRandom,
        aad: &[u8],
        plaintext: &[u8],
    ) -> Result<Sealed, CryptoError> {
        let mut prefix = [0u8; 5];
        prefix[0] = FORMAT;
        prefix[1..].copy_from_slice(&self.version.to_be_bytes());
        seal_raw(&self.key, rng, &prefix, aad, plaintext).map(Sealed::from_bytes)
    }

    pub fn open(&self, aad: &[u8], sealed: &Sealed) -> Result<Vec<u8>, CryptoError> {
        let b = sealed.as_bytes();
        if sealed_version(sealed)? != self.version {
            return Err(CryptoError::Open);
        }
        open_raw(&self.key, &b[5..HEADER], aad, &b[HEADER..])
    }
}

/// The key version a sealed value was sealed with.
pub fn sealed_version(sealed: &Sealed) -> Result<u32, CryptoError> {
    let b = sealed.as_bytes();
    if b.len() < HEADER + TAG || b[0] != FORMAT {
        return Err(CryptoError::Malformed);
    }
    let mut v = [0u8; 4];
    v.copy_from_slice(&b[1..5]);
    Ok(u32::from_be_bytes(v))
}

/// The master key: wraps and unwraps data keys. Never leaves the process.
pub struct MasterKey {
    key: LessSafeKey,
}

impl MasterKey {
    pub fn new(bytes: &[u8; 32]) -> Result<Self, CryptoError> {
        let key = UnboundKey::new(&AES_256_GCM, bytes)
            .map_err(|_| CryptoError::BadKeyMaterial("master key"))?;
        Ok(Self {
            key: LessSafeKey::new(key),
        })
    }

    fn aad(subject_id: &str, version: u32) -> Vec<u8> {
        field_aad(subject_id, &version.to_string())
    }

    /// A fresh data key and its wrapped form.
    pub fn generate(
        &self,
        rng: &SystemRandom,
        subject_id: &str,
        version: u32,
    ) -> Result<(DataKey, Vec<u8>), CryptoError> {
        let raw: [u8; 32] = random(rng)?;
        let wrapped = seal_raw(
            &self.key,
            rng,
            &[FORMAT],
            &Self::aad(subject_id, version),
            &raw,
        )?;
        Ok((DataKey::from_bytes(version, &raw)?, wrapped))
    }

    pub fn unwrap_key(
        &self,
        subject_id: &str,
        version: u32,
        wrapped: &[u8],
    ) -> Result<DataKey, CryptoError> {
        if wrapped.len() < 1 + NONCE_LEN + TAG || wrapped[0] != FORMAT {
            return Err(CryptoError::Malformed);
        }
        let raw = open_raw(
            &self.key,
            &wrapped[1..1 + NONCE_LEN],
            &Self::aad(subject_id, version),
            &wrapped[1 + NONCE_LEN..],
        )?;
        DataKey::from_bytes(version, &raw)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn master() -> MasterKey {
        MasterKey::new(&[7u8; 32]).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn sealed_pii_opens_only_with_its_key_subject_and_field() -> Result<(), CryptoError> {
        let rng = SystemRandom::new();
        let (key, wrapped) = master().generate(&rng, "s1", 1)?;
        let sealed = key.seal(&rng, &field_aad("s1", "email"), b"ada@example.org")?;
        assert_eq!(
            key.open(&field_aad("s1", "email"), &sealed)?,
            b"ada@example.org"
        );
        assert_eq!(
            key.open(&field_aad("s2", "email"), &sealed),
            Err(CryptoError::Open)
        );
        assert_eq!(
            key.open(&field_aad("s1", "phone"), &sealed),
            Err(CryptoError::Open)
        );
        let unwrapped = master().unwrap_key("s1", 1, &wrapped)?;
        assert_eq!(
            unwrapped.open(&field_aad("s1", "email"), &sealed)?,
            b"ada@example.org"
        );
        assert_eq!(
            master().unwrap_key("s2", 1, &wrapped).err(),
            Some(CryptoError::Open)
        );
        let (other, _) = master().generate(&rng, "s1", 2)?;
        assert_eq!(
            other.open(&field_aad("s1", "email"), &sealed),
            Err(CryptoError::Open)
        );
        assert_eq!(sealed_version(&sealed)?, 1);
        Ok(())
    }

    #[test]
    fn tampering_and_garbage_are_refused() -> Result<(), CryptoError> {
        let rng = SystemRandom::new();
        let (key, _) = master().generate(&rng, "s", 1)?;
        let sealed = key.seal(&rng, b"aad", b"secret")?;
        let mut bytes = sealed.as_bytes().to_vec();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        assert_eq!(
            key.open(b"aad", &Sealed::from_bytes(bytes)),
            Err(CryptoError::Open)
        );
        assert_eq!(
            key.open(b"aad", &Sealed::from_bytes(vec![1, 2, 3])),
            Err(CryptoError::Malformed)
        );
        // Two seals of the same plaintext differ (random nonces).
        assert_ne!(
            key.seal(&rng, b"aad", b"secret")?,
            key.seal(&rng, b"aad", b"secret")?
        );
        Ok(())
    }
}
