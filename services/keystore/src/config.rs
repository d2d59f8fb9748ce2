//! Key material from the environment. Secrets have no defaults and are never printed.

use std::fmt;
use std::time::Duration;

use clap::Args;
use sqlx::PgPool;

use crate::crypto::{CryptoError, MasterKey};
use crate::erasure::SuppressionKey;
use crate::identifiers::IdentifierHasher;
use crate::store::KeyStore;
use crate::vault::Vault;

#[derive(Args, Clone)]
pub struct KeyArgs {
    /// Master key wrapping every subject key: 64 hex characters (32 bytes). Secret.
    #[arg(long = "master-key", env = "CDP_MASTER_KEY", hide_env_values = true)]
    pub master_key: String,
    /// Key of the identifier vault's digests (HMAC-SHA256): 64 hex characters. Secret;
    /// changing it orphans every vault row (known identifiers get new tokens).
    #[arg(
        long = "identifier-key",
        env = "CDP_IDENTIFIER_KEY",
        hide_env_values = true
    )]
    pub identifier_key: String,
    /// Region assumed for phone numbers without a country code (ISO 3166-1 alpha-2).
    #[arg(
        long = "default-phone-region",
        env = "CDP_DEFAULT_PHONE_REGION",
        default_value = "US"
    )]
    pub default_phone_region: String,
    /// Longest time, in milliseconds, a data key or identifier token that an erasure
    /// destroyed stays usable from this process's caches (how often a process using its
    /// caches checks the key store for erasures).
    #[arg(
        long = "erasure-propagation-ms",
        env = "CDP_ERASURE_PROPAGATION_MS",
        default_value_t = 1000
    )]
    pub erasure_propagation_ms: u64,
    /// Most identifier tokens cached in this process.
    #[arg(
        long = "vault-cache-entries",
        env = "CDP_VAULT_CACHE_ENTRIES",
        default_value_t = 200_000
    )]
    pub vault_cache_entries: usize,
}

impl fmt::Debug for KeyArgs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyArgs")
            .field("master_key", &"<secret>")
            .field("identifier_key", &"<secret>")
            .field("default_phone_region", &self.default_phone_region)
            .field("erasure_propagation_ms", &self.erasure_propagation_ms)
            .field("vault_cache_entries", &self.vault_cache_entries)
            .finish()
    }
}

fn key_bytes(name: &'static str, hex_key: &str) -> Result<[u8; 32], CryptoError> {
    let bytes = hex::decode(hex_key.trim()).map_err(|_| CryptoError::BadKeyMaterial(name))?;
    bytes
        .try_into()
        .map_err(|_| CryptoError::BadKeyMaterial(name))
}

impl KeyArgs {
    /// Key material with every other setting at its documented default.
    pub fn with_keys(master_key: String, identifier_key: String) -> Self {
        Self {
            master_key,
            identifier_key,
            default_phone_region: "US".to_owned(),
            erasure_propagation_ms: 1000,
            vault_cache_entries: 200_000,
        }
    }

    pub fn master(&self) -> Result<MasterKey, CryptoError> {
        MasterKey::new(&key_bytes("CDP_MASTER_KEY", &self.master_key)?)
    }

    pub fn hasher(&self) -> Result<IdentifierHasher, CryptoError> {
        Ok(IdentifierHasher::new(
            &key_bytes("CDP_IDENTIFIER_KEY", &self.identifier_key)?,
            &self.default_phone_region,
        ))
    }

    pub fn propagation(&self) -> Duration {
        Duration::from_millis(self.erasure_propagation_ms)
    }

    /// The key store on `pool` (the database holding `subject_keys`).
    pub fn key_store(&self, pool: PgPool) -> Result<KeyStore, CryptoError> {
        Ok(KeyStore::new(pool, self.master()?, self.propagation()))
    }

    /// The identifier vault on `pool` (the database holding `identifier_vault`).
    pub fn vault(&self, pool: PgPool) -> Result<Vault, CryptoError> {
        Ok(Vault::new(
            pool,
            self.hasher()?,
            self.suppression_key()?,
            self.vault_cache_entries,
            self.propagation(),
        ))
    }

    /// The suppression registry's key (derived from the master key).
    pub fn suppression_key(&self) -> Result<SuppressionKey, CryptoError> {
        Ok(SuppressionKey::from_master(&key_bytes(
            "CDP_MASTER_KEY",
            &self.master_key,
        )?))
    }
}
