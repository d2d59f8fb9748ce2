//! `cdp erasure verify`: searches the stores for what a completed request erased and reports
//! what it found, for the compliance team to file.
//!
//! Postgres: every row of every table in every schema of the database (every projector
//! generation, identity, the key store, the vault, rejections, access audit, outboxes), as
//! text, for the request's tokens and profile ids, written as text or as the hex of their
//! bytes (Avro records in outboxes carry tokens as bytes). Three places hold them by design
//! and are reported apart: the erasure ledger (`erased_tokens`, `erased_profiles`: what
//! replays skip), the key store's rows of destroyed keys (`subject_keys` with no key: they
//! must hold none), the request's own row, and the profile API's access log (who read which
//! profile id when: accountability for the reads before the erasure; no value is in it).
//!
//! Topics and the archive: every record, key, value and headers, as bytes, for the same
//! forms (tokens as text; profile ids as text, as hex and as their 16 bytes), judged by
//! what the store is ([`Kind`]): the latest record of each key of a compacted topic must not
//! name the person (a tombstone names nothing); the audit topic must never name them; event
//! topics, the dead-letter topic and the archive keep the person's records (the log is
//! immutable) naming tokens no vault row leads to any more, and every sealed value in them
//! is tried against the key store: none may have a key left to open it.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use cdp_keystore::crypto::sealed_version;
use cdp_keystore::{KeyStore, KeyStoreError};
use cdp_schemas::model::profile::ProfilePayload;
use cdp_schemas::{CapsuleEvent, CustomerEvent, ProfileEvent, Sealed};
use memchr::memmem::Finder;
use sqlx::PgConnection;
use uuid::Uuid;

/// Tables that hold the erased tokens or profiles by design.
const BY_DESIGN: &[(&str, &str)] = &[
    (
        "erased_tokens",
        "the erasure ledger: replays and restores skip these tokens",
    ),
    (
        "erased_profiles",
        "the erasure ledger: replays and restores skip these profiles",
    ),
    ("erasure_requests", "the request itself (what to verify)"),
    (
        "profile_access_audit",
        "the profile API's access log: who read the profile and when, by an id that links to no one",
    ),
];

/// What verify found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    pub request_id: Uuid,
    pub tokens: usize,
    pub profiles: usize,
    /// Tables searched (`schema.table`).
    pub tables_searched: usize,
    /// Rows naming the person, per `schema.table`: must be empty.
    pub found: BTreeMap<String, i64>,
    /// Rows holding them by design, per `schema.table`, with why.
    pub by_design: BTreeMap<String, (i64, &'static str)>,
    /// Data keys of the person still usable: must be 0.
    pub live_keys: i64,
    /// Topics and archive files searched, one entry per topic or archived topic.
    pub stores: Vec<StoreReport>,
}

impl Report {
    /// Nothing of the person is left where it must not be.
    pub fn clean(&self) -> bool {
        self.found.is_empty() && self.live_keys == 0 && self.stores.iter().all(StoreReport::clean)
    }
}

/// How the records of a topic or archive are judged.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Kind {
    /// Keyed snapshots (profiles, identity): the latest record of each key must not name
    /// the person; older ones are history until the broker compacts them.
    Compacted,
    /// Events (and the dead-letter topic, and every archived topic): the person's records
    /// stay, naming tokens that lead nowhere; none of their sealed values may open.
    #[default]
    Events,
    /// The compliance topic: requests and scopes name the tokens by design.
    Compliance,
    /// Must never name the person (the audit topic).
    Nowhere,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Compacted => "compacted",
            Kind::Events => "events",
            Kind::Compliance => "compliance",
            Kind::Nowhere => "audit",
        }
    }
}

/// What the search of one topic or archived topic found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoreReport {
    /// `topic <name>` or `archive <location> <topic>`.
    pub store: String,
    pub kind: Kind,
    pub records: u64,
    /// Records naming the person's tokens or profile ids.
    pub naming: u64,
    /// Records naming the person where nothing may (the latest record of a compacted key,
    /// the audit topic): must be 0.
    pub found: u64,
    /// Sealed values in the person's records.
    pub sealed: u64,
    /// Of those, values whose data key still exists (they would open): must be 0.
    pub openable: u64,
}

impl StoreReport {
    pub fn clean(&self) -> bool {
        self.found == 0 && self.openable == 0
    }
}

/// The byte forms of a request's scope, searched for in records.
pub struct Needles {
    finders: Vec<Finder<'static>>,
}

impl Needles {
    pub fn new(tokens: &[String], profiles: &[Uuid]) -> Self {
        let mut forms: Vec<Vec<u8>> = Vec::new();
        for t in tokens {
            forms.push(t.as_bytes().to_vec());
        }
        for p in profiles {
            forms.push(p.to_string().into_bytes());
            forms.push(p.simple().to_string().into_bytes());
            forms.push(p.as_bytes().to_vec());
        }
        forms.sort();
        forms.dedup();
        Self {
            finders: forms.iter().map(|f| Finder::new(f).into_owned()).collect(),
        }
    }

    /// Whether `bytes` holds any form.
    pub fn any(&self, bytes: &[u8]) -> bool {
        self.finders.iter().any(|f| f.find(bytes).is_some())
    }
}

/// The search of one topic or archived topic: feed it every record, then [`finish`].
///
/// [`finish`]: StoreSearch::finish
pub struct StoreSearch {
    needles: Arc<Needles>,
    report: StoreReport,
    /// Per key of a compacted topic: whether its latest record names the person.
    latest: HashMap<Vec<u8>, bool>,
    /// Sealed values of the person's records, per (subject, key version).
    sealed: BTreeMap<(String, u32), u64>,
}

impl StoreSearch {
    pub fn new(needles: Arc<Needles>, store: String, kind: Kind) -> Self {
        Self {
            needles,
            report: StoreReport {
                store,
                kind,
                ..StoreReport::default()
            },
            latest: HashMap::new(),
            sealed: BTreeMap::new(),
        }
    }

    /// One record: its key, value (`None` for a tombstone) and header values.
    pub fn record<'h>(
        &mut self,
        key: Option<&[u8]>,
        value: Option<&[u8]>,
        headers: impl IntoIterator<Item = &'h [u8]>,
    ) {
        self.report.records += 1;
        let names = key.is_some_and(|k| self.needles.any(k))
            || value.is_some_and(|v| self.needles.any(v))
            || headers.into_iter().any(|h| self.needles.any(h));
        if self.report.kind == Kind::Compacted {
            if let Some(k) = key {
                self.latest.insert(k.to_vec(), names && value.is_some());
            }
        }
        if !names {
            return;
        }
        self.report.naming += 1;
        if self.report.kind == Kind::Nowhere {
            self.report.found += 1;
        }
        for (subject, s) in value.map(sealed_values).unwrap_or_default() {
            self.report.sealed += 1;
            // A value not in the sealed format is no key's to open.
            if let Ok(version) = sealed_version(&s) {
                *self.sealed.entry((subject, version)).or_default() += 1;
            }
        }
    }

    /// The report, once every record was fed: the latest records judged and the sealed
    /// values tried against the key store.
    pub async fn finish(mut self, keys: &KeyStore) -> Result<StoreReport, KeyStoreError> {
        self.report.found += self.latest.values().filter(|named| **named).count() as u64;
        let wanted: Vec<(String, u32)> = self.sealed.keys().cloned().collect();
        for chunk in wanted.chunks(1_000) {
            let found = keys.keys(chunk).await?;
            for (id, key) in found {
                if key.is_some() {
                    self.report.openable += self.sealed.get(&id).copied().unwrap_or(0);
                }
            }
        }
        Ok(self.report)
    }
}

/// The sealed values of an encoded event, with the subject whose key seals each.
fn sealed_values(value: &[u8]) -> Vec<(String, Sealed)> {
    let under = |subject: &str, pii: Vec<(&'static str, &Option<Sealed>)>| {
        pii.into_iter()
            .filter_map(|(_, s)| s.clone().map(|s| (subject.to_owned(), s)))
            .collect()
    };
    if let Ok(e) = cdp_schemas::decode::<CustomerEvent>(value) {
        return under(&e.envelope.subject.subject_id, e.payload.pii());
    }
    if let Ok(e) = cdp_schemas::decode::<CapsuleEvent>(value) {
        return under(&e.envelope.subject.subject_id, e.payload.pii());
    }
    if let Ok(e) = cdp_schemas::decode::<ProfileEvent>(value) {
        let ProfilePayload::Snapshot(s) = e.payload;
        return s
            .traits
            .into_iter()
            .filter_map(|t| t.sealed.map(|s| (t.subject_id, s)))
            .collect();
    }
    Vec::new()
}

/// The pattern of every form a token or profile id takes in a row's text.
fn pattern(tokens: &[String], profiles: &[Uuid]) -> String {
    let mut alternatives: Vec<String> = Vec::new();
    for t in tokens {
        alternatives.push(regex_escape(t));
        alternatives.push(hex(t.as_bytes()));
    }
    for p in profiles {
        let s = p.to_string();
        alternatives.push(hex(s.as_bytes()));
        alternatives.push(s);
        alternatives.push(p.simple().to_string());
        alternatives.push(hex(p.as_bytes()));
    }
    alternatives.sort();
    alternatives.dedup();
    alternatives.join("|")
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Escapes the regular-expression characters of a token (tokens are hex, but the search
/// must not depend on it).
fn regex_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if "\\.+*?()|[]{}^$".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// Searches every table of the database for the request's scope.
pub async fn search_postgres(
    conn: &mut PgConnection,
    request_id: Uuid,
    tokens: &[String],
    profiles: &[Uuid],
) -> Result<Report, sqlx::Error> {
    let mut report = Report {
        request_id,
        tokens: tokens.len(),
        profiles: profiles.len(),
        ..Report::default()
    };
    if tokens.is_empty() && profiles.is_empty() {
        return Ok(report);
    }
    let re = pattern(tokens, profiles);
    let tables: Vec<(String, String)> = sqlx::query_as(
        "SELECT table_schema::text, table_name::text FROM information_schema.tables
          WHERE table_type = 'BASE TABLE'
            AND table_schema NOT IN ('pg_catalog', 'information_schema')
            AND table_schema NOT LIKE 'pg_toast%'
          ORDER BY 1, 2",
    )
    .fetch_all(&mut *conn)
    .await?;
    for (schema, table) in tables {
        let name = format!("{schema}.{table}");
        let sql = format!(
            "SELECT count(*) FROM \"{}\".\"{}\" t WHERE lower(t::text) ~ $1",
            schema.replace('"', "\"\""),
            table.replace('"', "\"\"")
        );
        let n: i64 = sqlx::query_scalar(&sql)
            .bind(&re)
            .fetch_one(&mut *conn)
            .await?;
        report.tables_searched += 1;
        if n == 0 {
            continue;
        }
        if table == "subject_keys" {
            // Rows of destroyed keys are kept (versions stay taken): they must hold no key.
            report.live_keys += sqlx::query_scalar::<_, i64>(&format!(
                "SELECT count(*) FROM \"{}\".subject_keys
                  WHERE subject_id = ANY($1) AND wrapped_key IS NOT NULL",
                schema.replace('"', "\"\"")
            ))
            .bind(tokens)
            .fetch_one(&mut *conn)
            .await?;
            report.by_design.insert(
                name,
                (n, "the key store's rows of destroyed keys (no key in them)"),
            );
        } else if let Some((_, why)) = BY_DESIGN.iter().find(|(t, _)| *t == table) {
            report.by_design.insert(name, (n, why));
        } else {
            report.found.insert(name, n);
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pattern_covers_text_and_hex_forms() {
        let p = Uuid::from_u128(0xabcdef);
        let re = pattern(&["a1b2".to_owned()], &[p]);
        for form in [
            "a1b2".to_owned(),
            hex(b"a1b2"),
            p.to_string(),
            p.simple().to_string(),
            hex(p.to_string().as_bytes()),
        ] {
            assert!(re.split('|').any(|a| a == form), "{form} in {re}");
        }
        assert_eq!(regex_escape("a.b|c"), "a\\.b\\|c");
    }

    #[test]
    fn a_report_is_clean_only_without_findings_and_live_keys() {
        let mut r = Report::default();
        assert!(r.clean());
        r.live_keys = 1;
        assert!(!r.clean());
        r.live_keys = 0;
        r.found.insert("p_read.customers".to_owned(), 1);
        assert!(!r.clean());
    }
}
