//! The key store every service shares.
//!
//! - [`crypto`]: AES-256-GCM sealing of PII with a subject's data key, and wrapping of data
//!   keys by the master key (`ring`).
//! - [`identifiers`]: normalization (email case and whitespace, phone to E.164) and keyed
//!   hashes (HMAC-SHA256) of identifiers, so the log and the graph never hold them in plaintext.
//! - [`store`]: per-subject keys in Postgres, created on first sight, destroyed by erasure.

pub mod config;
pub mod crypto;
pub mod identifiers;
pub mod store;

pub use crypto::{CryptoError, DataKey, MasterKey};
pub use identifiers::{BlockPatterns, IdentifierHasher, NormalizeError, RawIdentifier};
pub use store::{KeyStore, KeyStoreError};
