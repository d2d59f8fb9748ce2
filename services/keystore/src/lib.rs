//! The key store every service shares.
//!
//! - [`crypto`]: AES-256-GCM sealing of PII with a subject's data key, and wrapping of data
//!   keys by the master key (`ring`).
//! - [`identifiers`]: normalization (email case and whitespace, phone to E.164) and the
//!   keyed digests (HMAC-SHA256) the vault looks identifiers up by.
//! - [`vault`]: random tokens for identifiers, so the log, the graph and the read models
//!   never hold an identifier, not even hashed; erasure deletes the vault rows.
//! - [`store`]: per-subject keys in Postgres, created on first sight, destroyed by erasure.
//! - `epoch`: how a destruction reaches every process's caches within a bounded time.
//! - [`erasure`]: shredding a person (suppression registry, erasure ledger, keys and vault
//!   rows, in one transaction) and keeping them out.

pub mod config;
pub mod crypto;
mod epoch;
pub mod erasure;
pub mod identifiers;
pub mod store;
pub mod vault;

pub use crypto::{CryptoError, DataKey, MasterKey};
pub use identifiers::{
    BlockPatterns, Digest, IdentifierHasher, NormalizeError, Normalized, RawIdentifier,
};
pub use store::{KeyStore, KeyStoreError};
pub use vault::{Vault, VaultError};
