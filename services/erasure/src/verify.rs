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

use std::collections::BTreeMap;

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
}

impl Report {
    /// Nothing of the person is left where it must not be.
    pub fn clean(&self) -> bool {
        self.found.is_empty() && self.live_keys == 0
    }
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
