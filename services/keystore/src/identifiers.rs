//! Identifier normalization and the vault's keyed digests. The same person's email written
//! ` Ada@Example.ORG ` and `ada@example.org` normalizes to one value and one digest; the
//! digest reveals nothing without the identifier key, and it never leaves the vault (the
//! log, the graph and the read models carry the vault's random tokens instead).

use cdp_schemas::{Identifier, IdentifierKind};
use ring::hmac;

/// Longest identifier value accepted, after trimming.
pub const MAX_IDENTIFIER_LEN: usize = 256;

/// An identifier as a client sent it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawIdentifier {
    pub kind: IdentifierKind,
    /// For external ids: the issuing system (e.g. `salesforce`).
    pub namespace: Option<String>,
    pub value: String,
}

impl RawIdentifier {
    pub fn new(kind: IdentifierKind, value: impl Into<String>) -> Self {
        Self {
            kind,
            namespace: None,
            value: value.into(),
        }
    }
}

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum NormalizeError {
    #[error("is empty")]
    Empty,
    #[error("is longer than {MAX_IDENTIFIER_LEN} characters")]
    TooLong,
    #[error("is not a valid email address")]
    Email,
    #[error("is not a valid phone number ({0})")]
    Phone(String),
    #[error("external ids need a namespace (the issuing system)")]
    MissingNamespace,
}

/// A vault digest: HMAC-SHA256 of a normalized identifier under the identifier key.
pub type Digest = [u8; 32];

/// An identifier in canonical form: what the vault tokenizes. The value is plaintext
/// personal data: it is never logged (its `Debug` hides it), stored or used as a key.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Normalized {
    pub kind: IdentifierKind,
    /// For external ids: the issuing system, trimmed.
    pub namespace: Option<String>,
    pub value: String,
}

impl Normalized {
    /// The contract's identifier: this one's kind and namespace, with its token.
    pub fn with_token(&self, token: String) -> Identifier {
        Identifier {
            kind: self.kind,
            namespace: self.namespace.clone(),
            token,
        }
    }
}

impl std::fmt::Debug for Normalized {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Normalized")
            .field("kind", &self.kind)
            .field("namespace", &self.namespace)
            .field("value", &"<personal>")
            .finish()
    }
}

/// Normalizes identifiers and computes their keyed digests (the vault's lookup key).
pub struct IdentifierHasher {
    key: hmac::Key,
    region: Option<phonenumber::country::Id>,
}

/// A syntax check in the spirit of RFC 5321 limits (not the full RFC 5322 grammar).
pub fn is_valid_email(s: &str) -> bool {
    let Some((local, domain)) = s.rsplit_once('@') else {
        return false;
    };
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b >= 0x80)
    };
    let local_ok = !local.is_empty()
        && local.len() <= 64
        && !local.starts_with('.')
        && !local.ends_with('.')
        && !local.contains("..")
        && local.bytes().all(|b| {
            b.is_ascii_alphanumeric() || b"!#$%&'*+-/=?^_`{|}~.".contains(&b) || b >= 0x80
        });
    let labels: Vec<&str> = domain.split('.').collect();
    local_ok && s.len() <= 254 && labels.len() >= 2 && labels.iter().all(|l| label_ok(l))
}

impl IdentifierHasher {
    /// `default_region`: where phone numbers without a `+` country code are assumed to be.
    pub fn new(key: &[u8; 32], default_region: &str) -> Self {
        Self {
            key: hmac::Key::new(hmac::HMAC_SHA256, key),
            region: default_region.trim().to_ascii_uppercase().parse().ok(),
        }
    }

    /// The canonical form of a value: emails trimmed and lower-cased, phones in E.164,
    /// everything else trimmed.
    pub fn normalize(&self, kind: IdentifierKind, value: &str) -> Result<String, NormalizeError> {
        let v = value.trim();
        if v.is_empty() {
            return Err(NormalizeError::Empty);
        }
        if v.chars().count() > MAX_IDENTIFIER_LEN {
            return Err(NormalizeError::TooLong);
        }
        match kind {
            IdentifierKind::Email => {
                let e = v.to_lowercase();
                if is_valid_email(&e) {
                    Ok(e)
                } else {
                    Err(NormalizeError::Email)
                }
            }
            IdentifierKind::Phone => self.phone(v),
            _ => Ok(v.to_owned()),
        }
    }

    /// A phone number in E.164.
    pub fn phone(&self, v: &str) -> Result<String, NormalizeError> {
        let region = if v.starts_with('+') {
            None
        } else {
            self.region
        };
        let number =
            phonenumber::parse(region, v).map_err(|e| NormalizeError::Phone(e.to_string()))?;
        if !phonenumber::is_valid(&number) {
            return Err(NormalizeError::Phone(
                "no such number in its numbering plan".to_owned(),
            ));
        }
        Ok(number.format().mode(phonenumber::Mode::E164).to_string())
    }

    /// HMAC-SHA256 of `kind | 0 | namespace | 0 | normalized value`: the vault's key for
    /// an identifier. It never leaves the vault.
    pub fn digest(&self, id: &Normalized) -> Digest {
        let mut ctx = hmac::Context::with_key(&self.key);
        ctx.update(id.kind.as_str().as_bytes());
        ctx.update(&[0]);
        ctx.update(id.namespace.as_deref().unwrap_or("").as_bytes());
        ctx.update(&[0]);
        ctx.update(id.value.as_bytes());
        let mut out = [0u8; 32];
        out.copy_from_slice(ctx.sign().as_ref());
        out
    }

    /// One identifier in canonical form (external ids need a namespace).
    pub fn identifier(&self, raw: &RawIdentifier) -> Result<Normalized, NormalizeError> {
        let namespace = raw
            .namespace
            .as_deref()
            .map(str::trim)
            .filter(|n| !n.is_empty());
        if raw.kind == IdentifierKind::ExternalId && namespace.is_none() {
            return Err(NormalizeError::MissingNamespace);
        }
        Ok(Normalized {
            kind: raw.kind,
            namespace: namespace.map(str::to_owned),
            value: self.normalize(raw.kind, &raw.value)?,
        })
    }
}

/// Identifier values that must never link, as regular expressions over the normalized value
/// (`email:^test\+.*@example\.com$`). The identity graph holds tokens only, so patterns
/// are evaluated where the plaintext is — ingest and the publishing library — and the
/// identifiers they match travel with the event (the `cdp-blocked-identifiers` header) for
/// identity resolution to refuse and record.
/// The Kafka header listing, comma-separated, the tokens of an event's identifiers
/// that a blocked pattern matched.
pub const BLOCKED_HEADER: &str = "cdp-blocked-identifiers";

#[derive(Clone, Debug, Default)]
pub struct BlockPatterns {
    patterns: Vec<(IdentifierKind, regex::Regex)>,
}

#[derive(Debug, thiserror::Error)]
pub enum PatternError {
    #[error("blocked pattern {0}: expected kind:regex")]
    Shape(usize),
    #[error("blocked pattern {0}: `{1}` is not an identifier kind")]
    Kind(usize, String),
    #[error("blocked pattern {0}: {1}")]
    Regex(usize, Box<regex::Error>),
}

impl BlockPatterns {
    /// Parses `kind:regex` entries (`email`, `phone`, `user_id`, `anonymous_id`, `device_id`,
    /// `external_id`); blank entries are skipped.
    pub fn parse(entries: &[String]) -> Result<Self, PatternError> {
        let mut patterns = Vec::new();
        for (i, e) in entries
            .iter()
            .enumerate()
            .filter(|(_, e)| !e.trim().is_empty())
        {
            let (kind, re) = e.trim().split_once(':').ok_or(PatternError::Shape(i))?;
            let kind = IdentifierKind::from_symbol(&kind.trim().to_ascii_uppercase())
                .ok_or_else(|| PatternError::Kind(i, kind.to_owned()))?;
            let re = regex::Regex::new(re).map_err(|e| PatternError::Regex(i, Box::new(e)))?;
            patterns.push((kind, re));
        }
        Ok(Self { patterns })
    }

    pub fn is_empty(&self) -> bool {
        self.patterns.is_empty()
    }

    /// Whether a normalized value of this kind is blocked.
    pub fn blocks(&self, kind: IdentifierKind, normalized: &str) -> bool {
        self.patterns
            .iter()
            .any(|(k, re)| *k == kind && re.is_match(normalized))
    }
}

/// The subject an event is about: its user id if it has one, else its anonymous id, else its
/// first identifier. The subject id names the data key that seals the event's PII.
pub fn subject_id(identifiers: &[Identifier]) -> Option<String> {
    [IdentifierKind::UserId, IdentifierKind::AnonymousId]
        .iter()
        .find_map(|k| identifiers.iter().find(|i| i.kind == *k))
        .or_else(|| identifiers.first())
        .map(|i| i.token.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_patterns_match_normalized_values_of_their_kind() {
        let p = BlockPatterns::parse(&[
            r"email:^test(\+.*)?@example\.com$".to_owned(),
            " ".to_owned(),
            r"device_id:^0+$".to_owned(),
        ])
        .expect("patterns parse");
        assert!(p.blocks(IdentifierKind::Email, "test+42@example.com"));
        assert!(!p.blocks(IdentifierKind::Email, "ada@example.com"));
        assert!(!p.blocks(IdentifierKind::UserId, "test@example.com"));
        assert!(p.blocks(IdentifierKind::DeviceId, "0000"));
        assert!(BlockPatterns::parse(&["nokind".to_owned()]).is_err());
        assert!(BlockPatterns::parse(&["mail:x".to_owned()]).is_err());
        assert!(BlockPatterns::parse(&["email:(".to_owned()]).is_err());
    }

    fn hasher() -> IdentifierHasher {
        IdentifierHasher::new(&[3u8; 32], "GB")
    }

    #[test]
    fn emails_normalize_case_and_whitespace() {
        let h = hasher();
        assert_eq!(
            h.normalize(IdentifierKind::Email, "  Ada@Example.ORG "),
            Ok("ada@example.org".to_owned())
        );
        for bad in [
            "ada",
            "ada@",
            "@example.org",
            "ada@example",
            "a b@example.org",
            "ada@@example.org",
            "ada@ex..org",
        ] {
            assert_eq!(
                h.normalize(IdentifierKind::Email, bad),
                Err(NormalizeError::Email),
                "{bad}"
            );
        }
    }

    #[test]
    fn phones_become_e164() {
        let h = hasher();
        assert_eq!(
            h.normalize(IdentifierKind::Phone, "020 7123 4567"),
            Ok("+442071234567".to_owned())
        );
        assert_eq!(
            h.normalize(IdentifierKind::Phone, "+1 (415) 555-2671"),
            Ok("+14155552671".to_owned())
        );
        assert!(matches!(
            h.normalize(IdentifierKind::Phone, "12"),
            Err(NormalizeError::Phone(_))
        ));
        assert!(matches!(
            h.normalize(IdentifierKind::Phone, "not a phone"),
            Err(NormalizeError::Phone(_))
        ));
    }

    #[test]
    fn digests_are_keyed_stable_and_separate_kinds() {
        let h = hasher();
        let a = h.identifier(&RawIdentifier::new(
            IdentifierKind::Email,
            "Ada@Example.org",
        ));
        let b = h.identifier(&RawIdentifier::new(
            IdentifierKind::Email,
            "ada@example.org ",
        ));
        assert_eq!(a, b);
        let id = a.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(id.value, "ada@example.org");
        assert!(!format!("{id:?}").contains("ada"), "Debug hides the value");
        let as_user = Normalized {
            kind: IdentifierKind::UserId,
            ..id.clone()
        };
        assert_ne!(h.digest(&as_user), h.digest(&id), "kinds digest apart");
        let other_key = IdentifierHasher::new(&[4u8; 32], "GB");
        assert_ne!(
            other_key.digest(&id),
            h.digest(&id),
            "the digest depends on the key"
        );
        assert_eq!(
            h.identifier(&RawIdentifier::new(IdentifierKind::ExternalId, "42"))
                .err(),
            Some(NormalizeError::MissingNamespace)
        );
        let ns = |n: &str| RawIdentifier {
            kind: IdentifierKind::ExternalId,
            namespace: Some(n.to_owned()),
            value: "42".to_owned(),
        };
        let crm = h.identifier(&ns(" crm ")).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(crm.namespace.as_deref(), Some("crm"));
        let erp = h.identifier(&ns("erp")).unwrap_or_else(|e| panic!("{e}"));
        assert_ne!(h.digest(&crm), h.digest(&erp), "namespaces digest apart");
    }

    #[test]
    fn the_subject_is_the_user_id_first() {
        let id = |kind, token: &str| Identifier {
            kind,
            namespace: None,
            token: token.to_owned(),
        };
        let anon = id(IdentifierKind::AnonymousId, "a1");
        let user = id(IdentifierKind::UserId, "u1");
        let email = id(IdentifierKind::Email, "e1");
        assert_eq!(
            subject_id(&[email.clone(), anon.clone(), user.clone()]),
            Some(user.token)
        );
        assert_eq!(subject_id(&[email.clone(), anon.clone()]), Some(anon.token));
        assert_eq!(subject_id(std::slice::from_ref(&email)), Some(email.token));
        assert_eq!(subject_id(&[]), None);
    }
}
