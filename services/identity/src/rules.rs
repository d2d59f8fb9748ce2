//! The identity rules from configuration: priority, unique kinds, per-kind limits, blocked
//! values and time-to-live.

use std::collections::BTreeSet;

use cdp_keystore::identifiers::{IdentifierHasher, Normalized, RawIdentifier};
use cdp_schemas::IdentifierKind;
use clap::Args;

use crate::graph::{Kind, Micros, Rules};

#[derive(Args, Clone, Debug)]
pub struct RulesArgs {
    /// Identifier kinds that take part in identity resolution; others are ignored.
    #[arg(
        id = "identity_kinds",
        long = "identity-kinds",
        env = "CDP_IDENTITY_KINDS",
        value_delimiter = ',',
        default_value = "user_id,anonymous_id,email,phone,device_id,external_id"
    )]
    pub kinds: Vec<String>,
    /// Identifier priority, highest first: in an event, the highest-ranked identifier anchors
    /// the others, so when a rule refuses a link it is the lower-ranked one that stays out.
    #[arg(
        id = "identity_priority",
        long = "identity-priority",
        env = "CDP_IDENTITY_PRIORITY",
        value_delimiter = ',',
        default_value = "user_id,external_id,email,phone,device_id,anonymous_id"
    )]
    pub priority: Vec<String>,
    /// Unique kinds: a profile holds at most one value of each, and two profiles holding
    /// different values never merge (two different user ids stay two people).
    #[arg(
        id = "identity_unique",
        long = "identity-unique",
        env = "CDP_IDENTITY_UNIQUE",
        value_delimiter = ',',
        default_value = "user_id"
    )]
    pub unique: Vec<String>,
    /// Most values of a kind per profile, `kind=n` comma-separated.
    #[arg(
        id = "identity_limits",
        long = "identity-limits",
        env = "CDP_IDENTITY_LIMITS",
        value_delimiter = ',',
        default_value = "email=5,phone=5,device_id=20,external_id=10,anonymous_id=200"
    )]
    pub limits: Vec<String>,
    /// Time-to-live per kind (`anonymous_id=90d`; units s, m, h, d): a value not seen for that
    /// long (event time) does not link until it has been seen again. Empty: none.
    #[arg(
        id = "identity_ttl",
        long = "identity-ttl",
        env = "CDP_IDENTITY_TTL",
        value_delimiter = ',',
        default_value = ""
    )]
    pub ttl: Vec<String>,
    /// Values that never link, `kind:value` (external ids `external_id:namespace:value`),
    /// comma-separated. Normalized and replaced by their vault tokens at start, so they match
    /// however clients spell them. The graph holds only tokens, so rules match exact values.
    #[arg(
        id = "identity_blocked",
        long = "identity-blocked",
        env = "CDP_IDENTITY_BLOCKED",
        value_delimiter = ',',
        default_value = "email:test@example.com,email:test@test.com,email:null@null.com,email:noreply@example.com,email:no-reply@example.com,anonymous_id:null,anonymous_id:undefined,anonymous_id:0,user_id:null,user_id:undefined,user_id:0,user_id:anonymous,device_id:00000000-0000-0000-0000-000000000000,device_id:unknown,device_id:null"
    )]
    pub blocked: Vec<String>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RulesError {
    #[error("`{0}` is not an identifier kind (user_id, anonymous_id, email, phone, device_id, external_id)")]
    Kind(String),
    #[error("`{0}` is not kind=number")]
    Limit(String),
    #[error("`{0}` is not kind=duration (e.g. anonymous_id=90d)")]
    Ttl(String),
    #[error("blocked value `{entry}`: {reason}")]
    Blocked { entry: String, reason: String },
}

fn kind(s: &str) -> Result<Kind, RulesError> {
    match Kind::parse(s) {
        Some(k @ Kind::Id(_)) => Ok(k),
        _ => Err(RulesError::Kind(s.trim().to_owned())),
    }
}

fn nonempty(list: &[String]) -> impl Iterator<Item = &str> {
    list.iter().map(|s| s.trim()).filter(|s| !s.is_empty())
}

/// Parses `90d`, `12h`, `30m`, `45s` into microseconds.
pub fn duration_micros(s: &str) -> Option<Micros> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit())?;
    let (n, unit) = s.split_at(split);
    let n: i64 = n.parse().ok()?;
    let secs = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3_600,
        "d" => 86_400,
        _ => return None,
    };
    n.checked_mul(secs)?.checked_mul(1_000_000)
}

/// The kinds that take part.
pub fn kinds(args: &RulesArgs) -> Result<BTreeSet<IdentifierKind>, RulesError> {
    nonempty(&args.kinds)
        .map(|s| match kind(s)? {
            Kind::Id(k) => Ok(k),
            Kind::Subject => Err(RulesError::Kind(s.to_owned())),
        })
        .collect()
}

/// Builds the rules, except the blocked values (see [`blocked`]: they need the vault).
pub fn rules(args: &RulesArgs) -> Result<Rules, RulesError> {
    let mut r = Rules {
        priority: nonempty(&args.priority)
            .map(kind)
            .collect::<Result<_, _>>()?,
        unique: nonempty(&args.unique).map(kind).collect::<Result<_, _>>()?,
        ..Rules::default()
    };
    for entry in nonempty(&args.limits) {
        let (k, n) = entry
            .split_once('=')
            .ok_or_else(|| RulesError::Limit(entry.to_owned()))?;
        let n: u32 = n
            .trim()
            .parse()
            .map_err(|_| RulesError::Limit(entry.to_owned()))?;
        r.limits.insert(kind(k)?, n);
    }
    for entry in nonempty(&args.ttl) {
        let (k, d) = entry
            .split_once('=')
            .ok_or_else(|| RulesError::Ttl(entry.to_owned()))?;
        let d = duration_micros(d).ok_or_else(|| RulesError::Ttl(entry.to_owned()))?;
        r.ttl.insert(kind(k)?, d);
    }
    Ok(r)
}

/// The blocked values, normalized, for the vault to replace by their tokens.
pub fn blocked(args: &RulesArgs, hasher: &IdentifierHasher) -> Result<Vec<Normalized>, RulesError> {
    let mut out = Vec::new();
    for entry in nonempty(&args.blocked) {
        let bad = |reason: String| RulesError::Blocked {
            entry: entry.to_owned(),
            reason,
        };
        let (k, rest) = entry
            .split_once(':')
            .ok_or_else(|| bad("expected kind:value".to_owned()))?;
        let Kind::Id(k) = kind(k)? else {
            return Err(bad("not an identifier kind".to_owned()));
        };
        let raw = if k == IdentifierKind::ExternalId {
            let (ns, v) = rest
                .split_once(':')
                .ok_or_else(|| bad("expected external_id:namespace:value".to_owned()))?;
            RawIdentifier {
                kind: k,
                namespace: Some(ns.to_owned()),
                value: v.to_owned(),
            }
        } else {
            RawIdentifier::new(k, rest)
        };
        out.push(hasher.identifier(&raw).map_err(|e| bad(e.to_string()))?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        rules: RulesArgs,
    }

    fn args(extra: &[&str]) -> RulesArgs {
        let mut argv = vec!["x"];
        argv.extend_from_slice(extra);
        Cli::try_parse_from(argv)
            .unwrap_or_else(|e| panic!("{e}"))
            .rules
    }

    fn hasher() -> IdentifierHasher {
        IdentifierHasher::new(&[7; 32], "GB")
    }

    #[test]
    fn defaults_parse_and_block_common_junk_however_spelled() {
        let r = rules(&args(&[])).unwrap_or_else(|e| panic!("{e}"));
        assert!(r.unique.contains(&Kind::Id(IdentifierKind::UserId)));
        assert_eq!(r.limits.get(&Kind::Id(IdentifierKind::Email)), Some(&5));
        let h = hasher();
        let junk = h
            .identifier(&RawIdentifier::new(
                IdentifierKind::Email,
                " TEST@Example.com ",
            ))
            .unwrap_or_else(|e| panic!("{e}"));
        let blocked = blocked(&args(&[]), &h).unwrap_or_else(|e| panic!("{e}"));
        assert!(blocked.contains(&junk));
        assert_eq!(kinds(&args(&[])).map(|k| k.len()), Ok(6));
    }

    #[test]
    fn bad_entries_are_named() {
        let h = hasher();
        assert_eq!(
            rules(&args(&["--identity-limits", "email=five"])).err(),
            Some(RulesError::Limit("email=five".to_owned()))
        );
        assert_eq!(
            rules(&args(&["--identity-unique", "mail"])).err(),
            Some(RulesError::Kind("mail".to_owned()))
        );
        assert!(matches!(
            blocked(&args(&["--identity-blocked", "email:not-an-email"]), &h),
            Err(RulesError::Blocked { .. })
        ));
        assert_eq!(
            rules(&args(&["--identity-ttl", "anonymous_id=3w"])).err(),
            Some(RulesError::Ttl("anonymous_id=3w".to_owned()))
        );
    }

    #[test]
    fn durations() {
        assert_eq!(duration_micros("90d"), Some(90 * 86_400 * 1_000_000));
        assert_eq!(duration_micros("2h"), Some(7_200_000_000));
        assert_eq!(duration_micros("d"), None);
        assert_eq!(duration_micros("10"), None);
    }
}
