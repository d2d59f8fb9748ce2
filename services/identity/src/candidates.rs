//! Fuzzy duplicate candidates: profiles that are probably one person although no identifier
//! links them (a customer who signed up twice with two emails).
//!
//! The identity graph holds vault tokens only, so names and addresses cannot be compared
//! there. The one place their plaintext legitimately lives is the projector's read model
//! (decrypted with each subject's key, gone when the key is destroyed), so a sweep reads the
//! `customer_360` view, groups profiles by country and postal code (blocking), and scores each
//! pair in a block: Jaro-Winkler similarity of the normalized names (best of the name as
//! written and its words sorted), of the streets, and whether the birth dates agree. Pairs at
//! or above the reporting threshold are kept in `identity_candidates` with their component
//! scores; the table holds profile ids and numbers only, no PII.
//!
//! A candidate is never merged unless an operator configured an automatic-merge threshold
//! and the pair meets it with a second field agreeing besides the name. Such a merge is not a
//! write to the graph: it is an `Alias` customer event (source `identity-candidates`, an
//! event id derived from the pair) published to the customer topic, so the log stays the
//! source of truth, the graph's rules still apply (two different user ids stay two people,
//! and the refusal is recorded), and a replay gives the same graph.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use cdp_runtime::kafka::producer::{OutgoingRecord, Producer};
use cdp_runtime::Shutdown;
use cdp_schemas::model::customer::Alias;
use cdp_schemas::{CustomerEvent, CustomerPayload, Envelope, Identifier, IdentifierKind, Subject};
use chrono::{DateTime, Utc};
use clap::Args;
use sqlx::PgPool;
use uuid::Uuid;

use crate::metrics::IdentityMetrics;

/// Namespace of automatic-merge events' ids: UUIDv5 of the pair, so a sweep retried after a
/// crash publishes the same event (absorbed by every consumer's event dedup).
const MERGE_NAMESPACE: Uuid = Uuid::from_u128(0x7c1e_55a0_2b1d_4f8e_8a3c_9d4e_0f11_0022);

/// The `source` of automatic-merge events.
pub const SOURCE: &str = "identity-candidates";

/// Weights of the components in a score (normalized over the components both profiles have).
const NAME_WEIGHT: f64 = 0.6;
const STREET_WEIGHT: f64 = 0.25;
const BIRTH_WEIGHT: f64 = 0.15;
/// Different birth dates on both sides halve the score (a parent and child of one name and
/// address are two people).
const BIRTH_MISMATCH_FACTOR: f64 = 0.5;
/// A street this similar counts as agreeing, for automatic merges.
const STREET_AGREES: f64 = 0.9;
/// Blocks up to this size compare every pair; larger ones compare each profile with the next
/// `WINDOW` in name order (sorted neighbourhood), so a city-sized postal code stays linear.
const ALL_PAIRS_UP_TO: usize = 300;
const WINDOW: usize = 50;

#[derive(Args, Clone, Debug, PartialEq)]
pub struct CandidateArgs {
    /// Schema of the projector's read views (`<prefix>_read`) whose `customer_360` the
    /// candidates are scored from.
    #[arg(
        long = "identity-candidates-source",
        env = "CDP_IDENTITY_CANDIDATES_SOURCE",
        default_value = "projector_read"
    )]
    pub source: String,
    /// Seconds between candidate sweeps; 0 turns the sweeps off (`cdp identity candidates`
    /// still runs one).
    #[arg(
        long = "identity-candidates-every",
        env = "CDP_IDENTITY_CANDIDATES_EVERY",
        default_value_t = 300
    )]
    pub every_secs: u64,
    /// Lowest score (0-1) reported as a duplicate candidate.
    #[arg(
        long = "identity-candidates-min",
        env = "CDP_IDENTITY_CANDIDATES_MIN",
        default_value_t = 0.88
    )]
    pub min_score: f64,
    /// Score (0-1) from which a candidate is merged automatically, when a second field (street
    /// or birth date) agrees besides the name; unset: never.
    #[arg(long = "identity-automerge", env = "CDP_IDENTITY_AUTOMERGE")]
    pub automerge: Option<f64>,
}

impl Default for CandidateArgs {
    fn default() -> Self {
        Self {
            source: "projector_read".to_owned(),
            every_secs: 300,
            min_score: 0.88,
            automerge: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CandidateError {
    #[error("database")]
    Db(#[from] sqlx::Error),
    #[error("the candidate source `{0}` has no customer_360 view (is the projector's read model there?)")]
    NoSource(String),
    #[error("`{0}` is not a valid schema name")]
    Schema(String),
    #[error("scores are between 0 and 1 and the automatic-merge threshold is not below the reporting one (min {min}, automerge {automerge:?})")]
    Thresholds { min: f64, automerge: Option<f64> },
    #[error("encoding a merge event")]
    Encode(#[from] cdp_schemas::CodecError),
    #[error("publishing a merge event")]
    Produce(#[from] cdp_runtime::kafka::producer::ProduceError),
}

impl CandidateArgs {
    pub fn check(&self) -> Result<(), CandidateError> {
        let unit = |x: f64| (0.0..=1.0).contains(&x);
        let ok = unit(self.min_score)
            && self
                .automerge
                .is_none_or(|a| unit(a) && a >= self.min_score);
        if !ok {
            return Err(CandidateError::Thresholds {
                min: self.min_score,
                automerge: self.automerge,
            });
        }
        crate::check_schema(&self.source).map_err(|_| CandidateError::Schema(self.source.clone()))
    }
}

/// A profile as scoring sees it (normalized).
#[derive(Clone, Debug, PartialEq)]
pub struct Person {
    pub profile_id: Uuid,
    pub name: String,
    /// The name's words in alphabetical order ("smith john" and "john smith" agree).
    pub sorted_name: String,
    pub street: Option<String>,
    pub birth_date: Option<String>,
}

impl Person {
    /// None without a name.
    pub fn new(
        profile_id: Uuid,
        first: Option<&str>,
        last: Option<&str>,
        street: Option<&str>,
        birth_date: Option<&str>,
    ) -> Option<Self> {
        let name = normalize(&format!(
            "{} {}",
            first.unwrap_or_default(),
            last.unwrap_or_default()
        ));
        if name.is_empty() {
            return None;
        }
        let mut words: Vec<&str> = name.split(' ').collect();
        words.sort_unstable();
        let sorted_name = words.join(" ");
        let present = |s: Option<&str>| s.map(normalize).filter(|s| !s.is_empty());
        Some(Self {
            profile_id,
            sorted_name,
            name,
            street: present(street),
            birth_date: present(birth_date),
        })
    }
}

/// Lower case, Latin accents folded, anything but letters and digits a separator, words
/// joined by one space.
pub fn normalize(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut gap = false;
    for c in s.chars().flat_map(char::to_lowercase) {
        let mut one = [0u8; 4];
        let folded: &str = match fold(c) {
            Some(f) => f,
            None => c.encode_utf8(&mut one),
        };
        for f in folded.chars() {
            if f.is_alphanumeric() {
                if gap && !out.is_empty() {
                    out.push(' ');
                }
                gap = false;
                out.push(f);
            } else {
                gap = true;
            }
        }
    }
    out
}

/// The ASCII spelling of a Latin letter with a diacritic; None for any other character.
fn fold(c: char) -> Option<&'static str> {
    Some(match c {
        'à' | 'á' | 'â' | 'ã' | 'ä' | 'å' | 'ā' | 'ă' | 'ą' => "a",
        'æ' => "ae",
        'ç' | 'ć' | 'č' => "c",
        'ď' | 'đ' => "d",
        'è' | 'é' | 'ê' | 'ë' | 'ē' | 'ė' | 'ę' | 'ě' => "e",
        'ğ' => "g",
        'ì' | 'í' | 'î' | 'ï' | 'ī' | 'į' | 'ı' => "i",
        'ł' | 'ľ' | 'ĺ' => "l",
        'ñ' | 'ń' | 'ň' => "n",
        'ò' | 'ó' | 'ô' | 'õ' | 'ö' | 'ø' | 'ō' | 'ő' => "o",
        'œ' => "oe",
        'ř' | 'ŕ' => "r",
        'ś' | 'š' | 'ş' | 'ș' => "s",
        'ß' => "ss",
        'ť' | 'ţ' | 'ț' => "t",
        'ù' | 'ú' | 'û' | 'ü' | 'ū' | 'ů' | 'ű' | 'ų' => "u",
        'ý' | 'ÿ' => "y",
        'ź' | 'ż' | 'ž' => "z",
        'þ' => "th",
        _ => return None,
    })
}

/// A pair's score and what it is made of.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Score {
    pub score: f64,
    pub name: f64,
    /// None unless both have a street.
    pub street: Option<f64>,
    /// None unless both have a birth date.
    pub birth_date: Option<bool>,
}

impl Score {
    /// Whether a field besides the name agrees (required for an automatic merge).
    pub fn corroborated(&self) -> bool {
        self.birth_date == Some(true) || self.street.is_some_and(|s| s >= STREET_AGREES)
    }
}

pub fn score(a: &Person, b: &Person) -> Score {
    let name = strsim::jaro_winkler(&a.name, &b.name)
        .max(strsim::jaro_winkler(&a.sorted_name, &b.sorted_name));
    let (mut total, mut weights) = (NAME_WEIGHT * name, NAME_WEIGHT);
    let street = match (&a.street, &b.street) {
        (Some(x), Some(y)) => {
            let s = strsim::jaro_winkler(x, y);
            total += STREET_WEIGHT * s;
            weights += STREET_WEIGHT;
            Some(s)
        }
        _ => None,
    };
    let birth_date = match (&a.birth_date, &b.birth_date) {
        (Some(x), Some(y)) => {
            weights += BIRTH_WEIGHT;
            if x == y {
                total += BIRTH_WEIGHT;
            }
            Some(x == y)
        }
        _ => None,
    };
    let mut score = total / weights;
    if birth_date == Some(false) {
        score *= BIRTH_MISMATCH_FACTOR;
    }
    Score {
        score,
        name,
        street,
        birth_date,
    }
}

/// The pairs of one block scoring at least `min`, each as (lower id, higher id, score).
pub fn block_pairs(block: &mut [Person], min: f64) -> Vec<(Uuid, Uuid, Score)> {
    let mut out = Vec::new();
    let window = if block.len() <= ALL_PAIRS_UP_TO {
        block.len()
    } else {
        block.sort_by(|a, b| (&a.sorted_name, a.profile_id).cmp(&(&b.sorted_name, b.profile_id)));
        WINDOW
    };
    for i in 0..block.len() {
        for j in i + 1..block.len().min(i + 1 + window) {
            let (a, b) = (&block[i], &block[j]);
            if a.profile_id == b.profile_id {
                continue;
            }
            let s = score(a, b);
            if s.score >= min {
                let (lo, hi) = if a.profile_id < b.profile_id {
                    (a.profile_id, b.profile_id)
                } else {
                    (b.profile_id, a.profile_id)
                };
                out.push((lo, hi, s));
            }
        }
    }
    out
}

/// The blocking key: country and postal code, normalized without spaces.
pub fn block_key(country: Option<&str>, postal_code: &str) -> String {
    let country = country.unwrap_or_default().trim().to_ascii_uppercase();
    let postal: String = normalize(postal_code).split(' ').collect();
    format!("{country}|{postal}")
}

/// What a sweep did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SweepReport {
    /// Profiles with a name and a postal code.
    pub profiles: usize,
    pub blocks: usize,
    /// Open candidates after the sweep.
    pub candidates: usize,
    /// Automatic-merge events published.
    pub merges: usize,
    /// False when another instance was sweeping.
    pub swept: bool,
}

type SourceRow = (
    Uuid,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<String>,
);

async fn read_people(
    pool: &PgPool,
    source: &str,
) -> Result<BTreeMap<String, Vec<Person>>, CandidateError> {
    let rows: Vec<SourceRow> = sqlx::query_as(&format!(
        "SELECT profile_id, first_name, last_name, street, birth_date, postal_code, country
           FROM \"{source}\".customer_360
          WHERE active AND postal_code IS NOT NULL
            AND (first_name IS NOT NULL OR last_name IS NOT NULL)"
    ))
    .fetch_all(pool)
    .await
    .map_err(|e| match &e {
        sqlx::Error::Database(d) if d.code().as_deref() == Some("42P01") => {
            CandidateError::NoSource(source.to_owned())
        }
        _ => CandidateError::Db(e),
    })?;
    let mut blocks: BTreeMap<String, Vec<Person>> = BTreeMap::new();
    for (id, first, last, street, birth, postal, country) in rows {
        let Some(postal) = postal else { continue };
        if let Some(p) = Person::new(
            id,
            first.as_deref(),
            last.as_deref(),
            street.as_deref(),
            birth.as_deref(),
        ) {
            blocks
                .entry(block_key(country.as_deref(), &postal))
                .or_default()
                .push(p);
        }
    }
    Ok(blocks)
}

/// Scores every block and replaces the open candidates with the result; with an
/// automatic-merge threshold, publishes an alias event for each open candidate meeting it.
/// One sweep at a time across instances (a transaction-scoped advisory lock).
pub async fn sweep(
    pool: &PgPool,
    args: &CandidateArgs,
    producer: &Producer,
    customer_topic: &str,
    metrics: &IdentityMetrics,
) -> Result<SweepReport, CandidateError> {
    args.check()?;
    let mut tx = pool.begin().await?;
    let (locked,): (bool,) = sqlx::query_as(
        "SELECT pg_try_advisory_xact_lock(hashtext(current_schema() || '.identity_candidates'))",
    )
    .fetch_one(&mut *tx)
    .await?;
    if !locked {
        return Ok(SweepReport::default());
    }
    let mut blocks = read_people(pool, &args.source).await?;
    let mut report = SweepReport {
        profiles: blocks.values().map(Vec::len).sum(),
        blocks: blocks.len(),
        swept: true,
        ..SweepReport::default()
    };
    let mut found: HashMap<(Uuid, Uuid), Score> = HashMap::new();
    for block in blocks.values_mut() {
        for (a, b, s) in block_pairs(block, args.min_score) {
            found.insert((a, b), s);
        }
    }
    let mut rows: Vec<(&(Uuid, Uuid), &Score)> = found.iter().collect();
    rows.sort_by(|x, y| x.0.cmp(y.0));
    let a: Vec<Uuid> = rows.iter().map(|r| r.0 .0).collect();
    let b: Vec<Uuid> = rows.iter().map(|r| r.0 .1).collect();
    let total: Vec<f64> = rows.iter().map(|r| r.1.score).collect();
    let name: Vec<f64> = rows.iter().map(|r| r.1.name).collect();
    let street: Vec<Option<f64>> = rows.iter().map(|r| r.1.street).collect();
    let birth: Vec<Option<bool>> = rows.iter().map(|r| r.1.birth_date).collect();
    sqlx::query(
        "DELETE FROM identity_candidates c
          WHERE c.status = 'open'
            AND NOT EXISTS (SELECT 1 FROM UNNEST($1::uuid[], $2::uuid[]) AS f(a, b)
                             WHERE f.a = c.profile_a AND f.b = c.profile_b)",
    )
    .bind(&a)
    .bind(&b)
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "INSERT INTO identity_candidates
                (profile_a, profile_b, score, name_score, street_score, birth_date_match)
         SELECT * FROM UNNEST($1::uuid[], $2::uuid[], $3::float8[], $4::float8[], $5::float8[], $6::bool[])
         ON CONFLICT (profile_a, profile_b) DO UPDATE
            SET score = EXCLUDED.score, name_score = EXCLUDED.name_score,
                street_score = EXCLUDED.street_score, birth_date_match = EXCLUDED.birth_date_match,
                scored_at = now()
          WHERE identity_candidates.status = 'open'",
    )
    .bind(&a)
    .bind(&b)
    .bind(&total)
    .bind(&name)
    .bind(&street)
    .bind(&birth)
    .execute(&mut *tx)
    .await?;
    if let Some(threshold) = args.automerge {
        let due: Vec<(Uuid, Uuid)> = rows
            .iter()
            .filter(|r| r.1.score >= threshold && r.1.corroborated())
            .map(|r| *r.0)
            .collect();
        report.merges = merge(&mut tx, &due, producer, customer_topic).await?;
        metrics.automerges.inc_by(report.merges as u64);
    }
    let (open,): (i64,) =
        sqlx::query_as("SELECT count(*) FROM identity_candidates WHERE status = 'open'")
            .fetch_one(&mut *tx)
            .await?;
    report.candidates = usize::try_from(open).unwrap_or_default();
    metrics.candidates.set(open);
    tx.commit().await?;
    Ok(report)
}

/// A profile's founding subject identifier, as events carry it.
async fn subject_identifier(
    tx: &mut sqlx::PgConnection,
    profile: Uuid,
) -> Result<Option<Identifier>, sqlx::Error> {
    let rows: Vec<(String, String, String)> = sqlx::query_as(
        "SELECT kind, namespace, token FROM identity_nodes
          WHERE profile_id = $1 AND subject AND kind <> 'SUBJECT'
          ORDER BY first_at, kind, token",
    )
    .bind(profile)
    .fetch_all(&mut *tx)
    .await?;
    // The subject whose own profile id is the profile's, else the earliest subject.
    let pick = rows
        .iter()
        .find(|r| cdp_schemas::profile_id_of(&r.2) == profile)
        .or(rows.first());
    Ok(pick.and_then(|(kind, ns, token)| {
        IdentifierKind::from_symbol(kind).map(|kind| Identifier {
            kind,
            namespace: (!ns.is_empty()).then(|| ns.clone()),
            token: token.clone(),
        })
    }))
}

/// The alias event that merges two profiles: about `a`'s subject, naming `b`'s.
pub fn merge_event(
    a: &Identifier,
    b: &Identifier,
    pair: (Uuid, Uuid),
    now: DateTime<Utc>,
) -> CustomerEvent {
    CustomerEvent {
        envelope: Envelope {
            event_id: Uuid::new_v5(
                &MERGE_NAMESPACE,
                format!("{}:{}", pair.0, pair.1).as_bytes(),
            ),
            occurred_at: now,
            received_at: now,
            source: SOURCE.to_owned(),
            subject: Subject {
                subject_id: a.token.clone(),
                identifiers: vec![a.clone()],
            },
            partition_key: a.token.clone(),
        },
        payload: CustomerPayload::Alias(Alias {
            previous: b.clone(),
        }),
    }
}

async fn merge(
    tx: &mut sqlx::PgConnection,
    due: &[(Uuid, Uuid)],
    producer: &Producer,
    topic: &str,
) -> Result<usize, CandidateError> {
    let open: Vec<(Uuid, Uuid)> = sqlx::query_as(
        "SELECT profile_a, profile_b FROM identity_candidates
          WHERE status = 'open' AND (profile_a, profile_b) IN
                (SELECT * FROM UNNEST($1::uuid[], $2::uuid[]))",
    )
    .bind(due.iter().map(|p| p.0).collect::<Vec<_>>())
    .bind(due.iter().map(|p| p.1).collect::<Vec<_>>())
    .fetch_all(&mut *tx)
    .await?;
    let now = Utc::now();
    let mut events = Vec::new();
    for pair in open {
        let (Some(a), Some(b)) = (
            subject_identifier(tx, pair.0).await?,
            subject_identifier(tx, pair.1).await?,
        ) else {
            tracing::warn!(profile_a = %pair.0, profile_b = %pair.1, "candidate not merged: a profile has no subject identifier in the graph");
            continue;
        };
        events.push((pair, merge_event(&a, &b, pair, now)));
    }
    let encoded = events
        .iter()
        .map(|(_, e)| Ok((e.envelope.partition_key.clone(), cdp_schemas::encode(e)?)))
        .collect::<Result<Vec<_>, CandidateError>>()?;
    let records: Vec<OutgoingRecord<'_>> = encoded
        .iter()
        .map(|(k, v)| OutgoingRecord {
            topic,
            key: Some(k.as_bytes()),
            value: Some(v),
            ..Default::default()
        })
        .collect();
    // Published before the candidates are marked: a crash in between publishes the same
    // event ids again next sweep, which every consumer's dedup absorbs.
    producer.send_all(&records).await?;
    for ((a, b), e) in &events {
        sqlx::query(
            "UPDATE identity_candidates SET status = 'alias_published', merge_event_id = $3
              WHERE profile_a = $1 AND profile_b = $2",
        )
        .bind(a)
        .bind(b)
        .bind(e.envelope.event_id)
        .execute(&mut *tx)
        .await?;
        tracing::info!(profile_a = %a, profile_b = %b, event_id = %e.envelope.event_id, "duplicate candidate merged automatically");
    }
    Ok(events.len())
}

/// Sweeps every `every_secs` until shutdown; a failed sweep is logged and retried next time.
pub async fn run_sweeps(
    pool: PgPool,
    args: CandidateArgs,
    producer: std::sync::Arc<Producer>,
    customer_topic: String,
    metrics: IdentityMetrics,
    shutdown: Shutdown,
) {
    if args.every_secs == 0 {
        return;
    }
    let every = Duration::from_secs(args.every_secs);
    loop {
        tokio::select! {
            _ = shutdown.wait() => return,
            _ = tokio::time::sleep(every) => {}
        }
        match sweep(&pool, &args, &producer, &customer_topic, &metrics).await {
            Ok(r) => tracing::info!(
                profiles = r.profiles,
                candidates = r.candidates,
                merges = r.merges,
                "duplicate candidates swept"
            ),
            Err(e) => tracing::warn!(error = %e, "duplicate candidate sweep failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn person(
        n: u128,
        first: &str,
        last: &str,
        street: Option<&str>,
        birth: Option<&str>,
    ) -> Person {
        Person::new(Uuid::from_u128(n), Some(first), Some(last), street, birth).expect("a name")
    }

    #[test]
    fn normalization_folds_case_accents_and_punctuation() {
        assert_eq!(
            normalize("  José  MÜLLER-Lüdenscheidt "),
            "jose muller ludenscheidt"
        );
        assert_eq!(normalize("O'Brien, Ærøskøbing"), "o brien aeroskobing");
        assert_eq!(normalize("Straße 5"), "strasse 5");
        assert_eq!(normalize(" -- "), "");
        assert_eq!(
            block_key(Some("de"), "10 115"),
            block_key(Some("DE"), "10115")
        );
    }

    #[test]
    fn a_typo_or_swapped_names_score_high_different_people_low() {
        let john = person(1, "John", "Smith", Some("12 High Street"), None);
        let jon = person(2, "Jon", "Smith", Some("12 High St"), None);
        let swapped = person(3, "Smith", "John", None, None);
        let mary = person(4, "Mary", "Jones", Some("12 High Street"), None);
        let s = score(&john, &jon);
        assert!(s.score > 0.9, "{s:?}");
        assert!(s.street.is_some_and(|x| x > 0.9) && s.corroborated());
        assert!(score(&john, &swapped).score > 0.99);
        assert!(!score(&john, &swapped).corroborated());
        assert!(score(&john, &mary).score < 0.8, "{:?}", score(&john, &mary));
    }

    #[test]
    fn different_birth_dates_keep_namesakes_apart() {
        let senior = person(
            1,
            "John",
            "Smith",
            Some("12 High Street"),
            Some("1950-03-01"),
        );
        let junior = person(
            2,
            "John",
            "Smith",
            Some("12 High Street"),
            Some("1985-07-09"),
        );
        let again = person(3, "John", "Smith", None, Some("1950-03-01"));
        assert!(score(&senior, &junior).score < 0.6);
        let s = score(&senior, &again);
        assert_eq!(s.birth_date, Some(true));
        assert!(s.score > 0.99 && s.corroborated());
    }

    #[test]
    fn pairs_are_ordered_and_large_blocks_stay_windowed() {
        let mut block = vec![
            person(9, "Anna", "Berg", None, None),
            person(3, "Ana", "Berg", None, None),
            person(5, "Zoe", "Quist", None, None),
        ];
        let pairs = block_pairs(&mut block, 0.88);
        assert_eq!(pairs.len(), 1);
        assert_eq!(
            (pairs[0].0, pairs[0].1),
            (Uuid::from_u128(3), Uuid::from_u128(9))
        );

        // 2,000 distinct names and one near-duplicate: found, with windowed comparisons.
        let mut big: Vec<Person> = (0..2_000u128)
            .map(|i| {
                person(
                    10 + i,
                    &format!("Name{i:04}x"),
                    &format!("Family{}", i * 7919 % 2_000),
                    None,
                    None,
                )
            })
            .collect();
        big.push(person(5_000, "Name0042x", "Family598", None, None));
        let found = block_pairs(&mut big, 0.999);
        assert!(found
            .iter()
            .any(|p| (p.0, p.1) == (Uuid::from_u128(52), Uuid::from_u128(5_000))));
    }

    #[test]
    fn thresholds_are_checked() {
        assert!(CandidateArgs::default().check().is_ok());
        let bad = CandidateArgs {
            automerge: Some(0.5),
            ..CandidateArgs::default()
        };
        assert!(bad.check().is_err());
        let bad = CandidateArgs {
            source: "x; drop".to_owned(),
            ..CandidateArgs::default()
        };
        assert!(bad.check().is_err());
    }

    #[test]
    fn defaults_match_the_command_line() {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            c: CandidateArgs,
        }
        let parsed = Cli::try_parse_from(["x"]).map(|c| c.c).ok();
        assert_eq!(parsed, Some(CandidateArgs::default()));
    }

    #[test]
    fn merge_events_are_the_same_for_the_same_pair() {
        let id = |h: &str| Identifier {
            kind: IdentifierKind::Email,
            namespace: None,
            token: h.to_owned(),
        };
        let pair = (Uuid::from_u128(1), Uuid::from_u128(2));
        let x = merge_event(&id("aa"), &id("bb"), pair, Utc::now());
        let y = merge_event(&id("aa"), &id("bb"), pair, Utc::now());
        assert_eq!(x.envelope.event_id, y.envelope.event_id);
        assert_eq!(x.envelope.subject.subject_id, "aa");
        assert!(matches!(&x.payload, CustomerPayload::Alias(a) if a.previous.token == "bb"));
    }
}
