//! Key material from the environment. Secrets have no defaults and are never printed.

use std::fmt;

use clap::Args;

use crate::crypto::{CryptoError, MasterKey};
use crate::identifiers::IdentifierHasher;

#[derive(Args, Clone)]
pub struct KeyArgs {
    /// Master key wrapping every subject key: 64 hex characters (32 bytes). Secret.
    #[arg(long = "master-key", env = "CDP_MASTER_KEY", hide_env_values = true)]
    pub master_key: String,
    /// Key of the identifier hashes (HMAC-SHA256): 64 hex characters. Secret; changing it
    /// changes every subject id.
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
    /// How long an unwrapped data key stays cached in this process, in seconds.
    #[arg(
        long = "key-cache-ttl-secs",
        env = "CDP_KEY_CACHE_TTL_SECS",
        default_value_t = 60
    )]
    pub key_cache_ttl_secs: u64,
}

impl fmt::Debug for KeyArgs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyArgs")
            .field("master_key", &"<secret>")
            .field("identifier_key", &"<secret>")
            .field("default_phone_region", &self.default_phone_region)
            .field("key_cache_ttl_secs", &self.key_cache_ttl_secs)
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
    pub fn master(&self) -> Result<MasterKey, CryptoError> {
        MasterKey::new(&key_bytes("CDP_MASTER_KEY", &self.master_key)?)
    }

    pub fn hasher(&self) -> Result<IdentifierHasher, CryptoError> {
        Ok(IdentifierHasher::new(
            &key_bytes("CDP_IDENTIFIER_KEY", &self.identifier_key)?,
            &self.default_phone_region,
        ))
    }
}
