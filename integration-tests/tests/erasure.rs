//! GDPR erasure end to end, against the real broker, Postgres and S3 server: a person's events
//! in through the HTTP API, resolved by identity, projected and archived; `cdp erase` by one
//! identifier; the processor and every service remove the person, verify proves it over
//! every store, an adversary holding every key finds nothing, and the control person is
//! untouched.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use cdp_erasure::Request;
use cdp_integration_tests::archive::{read_log, require_s3, s3_endpoint, s3_store, wait_gapless};
use cdp_integration_tests::identity::identity_for;
use cdp_integration_tests::ingest::{Ingest, Options};
use cdp_integration_tests::pipeline;
use cdp_integration_tests::{require_broker, wait_until};
use cdp_keystore::RawIdentifier;
use cdp_runtime::topics::Topic;
use cdp_schemas::model::compliance::ErasureOutcome;
use cdp_schemas::{ComplianceEvent, CompliancePayload, IdentifierKind};
use serde_json::json;
use sqlx::PgPool;
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(120);

/// The read views and the identity graph of the services that ran during the erasure.
const LIVE: (&str, &str) = ("p_e2e_read", "id_e2e");

/// Every row of a profile in the read models, as text (the control person's fingerprint).
async fn rows_of(pool: &PgPool, read: &str, profile: Uuid) -> anyhow::Result<Vec<String>> {
    let mut out = Vec::new();
    for table in [
        "customers",
        "customer_traits",
        "customer_identities",
        "interactions",
        "consents",
    ] {
        let rows: Vec<String> = sqlx::query_scalar(&format!(
            "SELECT t::text FROM {read}.{table} t WHERE profile_id = $1 ORDER BY 1"
        ))
        .bind(profile)
        .fetch_all(pool)
        .await?;
        out.extend(rows.into_iter().map(|r| format!("{table} {r}")));
    }
    Ok(out)
}

/// Rows that name any of the profiles or tokens, per table, in the read models and the graph.
async fn remains(
    pool: &PgPool,
    (read, graph): (&str, &str),
    profiles: &[Uuid],
    tokens: &[String],
) -> anyhow::Result<BTreeMap<&'static str, i64>> {
    let checks: [(&'static str, &str); 12] = [
        ("customers", "SELECT count(*) FROM p_e2e_read.customers WHERE profile_id = ANY($1) AND $2::text[] IS NOT NULL"),
        ("customer_traits", "SELECT count(*) FROM p_e2e_read.customer_traits WHERE profile_id = ANY($1) OR subject_id = ANY($2)"),
        ("customer_identities", "SELECT count(*) FROM p_e2e_read.customer_identities WHERE profile_id = ANY($1) OR token = ANY($2)"),
        ("interactions", "SELECT count(*) FROM p_e2e_read.interactions WHERE profile_id = ANY($1) OR origin = ANY($1) AND $2::text[] IS NOT NULL"),
        ("transactions", "SELECT count(*) FROM p_e2e_read.transactions WHERE profile_id = ANY($1) AND $2::text[] IS NOT NULL"),
        ("consents", "SELECT count(*) FROM p_e2e_read.consents WHERE profile_id = ANY($1) AND $2::text[] IS NOT NULL"),
        ("profile_merges", "SELECT count(*) FROM p_e2e_read.profile_merges WHERE (loser = ANY($1) OR winner = ANY($1)) AND $2::text[] IS NOT NULL"),
        ("identity_nodes", "SELECT count(*) FROM id_e2e.identity_nodes WHERE profile_id = ANY($1) OR token = ANY($2)"),
        ("identity_observations", "SELECT count(*) FROM id_e2e.identity_observations o LEFT JOIN id_e2e.identity_nodes n ON n.node_id = o.subject WHERE (n.node_id IS NULL OR n.token = ANY($2)) AND $1::uuid[] IS NOT NULL"),
        ("identity_candidates", "SELECT count(*) FROM id_e2e.identity_candidates WHERE (profile_a = ANY($1) OR profile_b = ANY($1)) AND $2::text[] IS NOT NULL"),
        ("identifier_vault", "SELECT count(*) FROM identifier_vault WHERE token = ANY($2) AND $1::uuid[] IS NOT NULL"),
        ("live subject_keys", "SELECT count(*) FROM subject_keys WHERE subject_id = ANY($2) AND wrapped_key IS NOT NULL AND $1::uuid[] IS NOT NULL"),
    ];
    let mut out = BTreeMap::new();
    for (what, sql) in checks {
        let sql = sql
            .replace("p_e2e_read.", &format!("{read}."))
            .replace("id_e2e.", &format!("{graph}."));
        let n: i64 = sqlx::query_scalar(&sql)
            .bind(profiles)
            .bind(tokens)
            .fetch_one(pool)
            .await?;
        out.insert(what, n);
    }
    Ok(out)
}

/// Where someone holding every key of the platform (master and identifier keys) and the
/// person's plaintext identifiers finds anything they can derive from them: the
/// identifiers as text, their keyed hashes (vault digests) and suppression entries, as
/// text, hex and bytes. Searched: every column of every table of the database, every
/// record of every topic of the platform and every record of the archive. Returns, per
/// place, what kind of derivation was found. `facts` are other values the adversary knows
/// of the person (an order id from the shop's records), searched as text.
async fn adversary(
    ing: &Ingest,
    archive: &cdp_archiver::Archive,
    identifiers: &[RawIdentifier],
    facts: &[&str],
) -> anyhow::Result<BTreeMap<String, BTreeSet<&'static str>>> {
    let hasher = ing.key_args.hasher()?;
    let suppression = ing.key_args.suppression_key()?;
    let mut forms: Vec<(&'static str, Vec<u8>)> = facts
        .iter()
        .map(|f| ("known fact", f.as_bytes().to_vec()))
        .collect();
    for raw in identifiers {
        let normalized = hasher.identifier(raw)?;
        // Short values can occur by chance in hex and ciphertext; these are long enough.
        for text in [raw.value.as_str(), normalized.value.as_str()] {
            if text.len() >= 8 {
                forms.push(("plaintext", text.as_bytes().to_vec()));
            }
        }
        let digest = hasher.digest(&normalized);
        let entry = suppression.entry(&digest);
        for (what, bytes) in [
            ("vault digest", digest.to_vec()),
            ("suppression entry", entry.to_vec()),
        ] {
            forms.push((what, hex(&bytes).into_bytes()));
            forms.push((what, bytes));
        }
    }
    let mut found: BTreeMap<String, BTreeSet<&'static str>> = BTreeMap::new();
    let mut look = |place: String, bytes: &[u8]| {
        for (what, form) in &forms {
            if bytes.windows(form.len()).any(|w| w == form.as_slice()) {
                found.entry(place.clone()).or_default().insert(*what);
            }
        }
    };
    let pool = &ing.db.pool;
    let tables: Vec<(String, String)> = sqlx::query_as(
        "SELECT table_schema::text, table_name::text FROM information_schema.tables
          WHERE table_type = 'BASE TABLE'
            AND table_schema NOT IN ('pg_catalog', 'information_schema')",
    )
    .fetch_all(pool)
    .await?;
    for (schema, table) in tables {
        // Every row as text: bytea columns show as hex, text as itself.
        let rows: Vec<String> = sqlx::query_scalar(&format!(
            "SELECT lower(t::text) FROM \"{schema}\".\"{table}\" t"
        ))
        .fetch_all(pool)
        .await?;
        for row in rows {
            look(format!("postgres {schema}.{table}"), row.as_bytes());
        }
    }
    for (name, _) in cdp_runtime::topics::catalogue(&ing.topics) {
        for r in read_log(&name).await?.into_values().flatten() {
            for part in [r.key.as_deref(), r.value.as_deref()].into_iter().flatten() {
                look(format!("topic {name}"), part);
            }
            for (_, v) in r.headers.iter() {
                look(format!("topic {name}"), v.unwrap_or_default());
            }
        }
        for file in archive.list(&name, None).await? {
            let (_, records) = archive.read(&file).await?;
            for r in records {
                for part in [r.key.as_deref(), r.value.as_deref()].into_iter().flatten() {
                    look(format!("archive {name}"), part);
                }
                for (_, v) in &r.headers {
                    look(format!("archive {name}"), v.as_deref().unwrap_or_default());
                }
            }
        }
    }
    Ok(found)
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The latest record of each key of a topic: `true` when it is a tombstone.
async fn latest_per_key(topic: &str) -> anyhow::Result<BTreeMap<String, bool>> {
    let mut latest = BTreeMap::new();
    for records in read_log(topic).await?.into_values() {
        for r in records {
            if let Some(k) = &r.key {
                latest.insert(String::from_utf8_lossy(k).into_owned(), r.value.is_none());
            }
        }
    }
    Ok(latest)
}

/// One person (an anonymous visitor who signs up with a user id, an email and a phone) and a
/// control person, through the HTTP API; identity merges the first into one cluster and
/// refuses the alias of an earlier account (a second user id: another person by its rules).
/// An erasure by the phone number alone removes the whole cluster from the read models, the
/// graph, the key store and the vault, reports the refused link without following it, leaves
/// tombstones as the latest record of each of its keys on the compacted topics, writes one
/// sealed audit record, refuses the phone afterwards, and leaves the control person and the
/// refused account exactly as they were. Verify, run the moment the request completes,
/// searches Postgres, every topic and the S3 archive and finds nothing that opens; someone
/// holding every key and the person's identifiers finds only the suppression entries; a
/// replay, and a restore of the archive projected from scratch, bring nobody back.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_erasure_by_phone_removes_the_whole_person_and_nobody_else() -> anyhow::Result<()> {
    cdp_integration_tests::log_from_env()?;
    require_broker().await?;
    let s3 = s3_endpoint();
    require_s3(&s3).await?;
    let store = s3_store(&s3);
    let ing = Ingest::start_with(Options {
        erasure_propagation_ms: 0,
        ..Options::default()
    })
    .await?;
    let (email, phone) = ("ada@example.org", "+1 415 555 0100");
    let batch = json!({"batch": [
        {"type": "page", "anonymousId": "anon-ada", "name": "Pricing",
         "properties": {"url": "https://shop.example/pricing"}, "messageId": "m1"},
        {"type": "identify", "anonymousId": "anon-ada", "userId": "ada",
         "traits": {"email": email, "phone": phone, "firstName": "Ada"}, "messageId": "m2"},
        {"type": "track", "userId": "ada", "event": "Product Viewed",
         "properties": {"sku": "A-1"}, "messageId": "m3"},
        {"type": "track", "userId": "ada", "event": "Order Completed", "messageId": "m3b",
         "properties": {"order_id": "ada-order-4711", "total": 99.5, "currency": "EUR",
                        "coupon": "ADA-WELCOME-10",
                        "products": [{"product_id": "p-1", "name": "Difference Engine",
                                      "quantity": 1, "price": 99.5}]}},
        {"type": "track", "userId": "ada-old", "event": "App Opened", "messageId": "m4"},
        {"type": "alias", "previousId": "ada-old", "userId": "ada", "messageId": "m5"},
        {"type": "identify", "userId": "grace",
         "traits": {"email": "grace@example.org", "firstName": "Grace"}, "messageId": "m6"},
        {"type": "track", "userId": "grace", "event": "Product Viewed",
         "properties": {"sku": "B-2"}, "messageId": "m7"},
    ]});
    let (status, body) = ing.post("/v1/batch", &batch).await?;
    assert_eq!(status, 200, "{body}");

    let ic = identity_for(&ing.kafka, &ing.db, &ing.key_args, "id_e2e");
    // The graph's tables exist before the test reads them.
    cdp_integration_tests::identity::create_graph(&ic).await?;
    let pc = pipeline::projector(&ing, "e2e");
    let ec = pipeline::erasure(&ing, "erasure_t", "id_e2e");
    let (stop_i, task_i) = cdp_integration_tests::identity::spawn(ic.clone());
    let (stop_p, task_p) = cdp_integration_tests::projector::spawn(pc.clone());
    let (stop_e, task_e) = pipeline::spawn_erasure(ec.clone());
    let archiver = pipeline::archiver(&ing, store.clone());
    let (stop_a, task_a) = cdp_integration_tests::archive::spawn(archiver);
    let archive = cdp_archiver::Archive::open(&store)?;
    let pool = ing.db.pool.clone();

    let ada = cdp_schemas::profile_id_of(&ing.token(IdentifierKind::UserId, "ada").await?);
    let grace = cdp_schemas::profile_id_of(&ing.token(IdentifierKind::UserId, "grace").await?);
    // Identity links the visitor, the account and the second device into one profile.
    // Identity links the visitor, the account, the email and the phone into one profile, and
    // refuses the alias of a second user id (one user id per person).
    cdp_integration_tests::identity::caught_up(&pool, &ic, &ing.topic(Topic::CustomerEvents), WAIT)
        .await?;
    let current: Uuid =
        sqlx::query_scalar("SELECT profile_id FROM id_e2e.identity_nodes WHERE token = $1")
            .bind(ing.token(IdentifierKind::Phone, phone).await?)
            .fetch_one(&pool)
            .await?;
    let tokens: Vec<String> = sqlx::query_scalar(
        "SELECT token FROM id_e2e.identity_nodes WHERE profile_id = $1 ORDER BY token",
    )
    .bind(current)
    .fetch_all(&pool)
    .await?;
    let mut expected = vec![
        ing.token(IdentifierKind::AnonymousId, "anon-ada").await?,
        ing.token(IdentifierKind::UserId, "ada").await?,
        ing.token(IdentifierKind::Email, email).await?,
        ing.token(IdentifierKind::Phone, phone).await?,
    ];
    expected.sort();
    assert_eq!(
        tokens, expected,
        "an anonymous id, a user id, an email, a phone"
    );
    let ada_old = cdp_schemas::profile_id_of(&ing.token(IdentifierKind::UserId, "ada-old").await?);
    let profiles: Vec<Uuid> = tokens
        .iter()
        .map(|t| cdp_schemas::profile_id_of(t))
        .chain([current, ada])
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    assert!(!profiles.contains(&ada_old));
    let links: Vec<Uuid> = sqlx::query_scalar(
        "SELECT l.link_id FROM id_e2e.identity_links l JOIN id_e2e.identity_nodes n
             ON n.node_id IN (l.from_node, l.to_node) WHERE n.token = ANY($1)",
    )
    .bind(&tokens)
    .fetch_all(&pool)
    .await?;
    assert!(!links.is_empty());
    cdp_integration_tests::projector::caught_up(&pool, &pc, WAIT, Duration::from_millis(100))
        .await?;
    let before = remains(&pool, LIVE, &profiles, &tokens).await?;
    assert!(
        before["customers"] == 1 && before["identity_nodes"] == 4,
        "{before:?}"
    );
    let grace_before = rows_of(&pool, LIVE.0, grace).await?;
    assert!(grace_before.len() >= 4, "{grace_before:?}");
    let ada_old_before = rows_of(&pool, LIVE.0, ada_old).await?;
    assert!(!ada_old_before.is_empty());

    // The archive holds every event of the person, as the log does.
    let events_topic = ing.topic(Topic::CustomerEvents);
    let events = read_log(&events_topic).await?;
    wait_gapless(&archive, &events_topic, &events, WAIT).await?;

    // The profile API finds her by email.
    let api_stop = cdp_runtime::Shutdown::new();
    let (api_addr, api_serve) = cdp_projector::bind_api(
        &ing.db.args(),
        &ing.key_args,
        "p_e2e",
        &cdp_projector::ApiArgs {
            api_addr: "127.0.0.1:0".parse()?,
            api_tokens: vec!["support:read:r-secret".to_owned()],
        },
        api_stop.clone(),
    )
    .await?;
    let api = tokio::spawn(api_serve);
    let lookup = || async {
        Ok::<_, anyhow::Error>(
            reqwest::Client::new()
                .get(format!(
                    "http://{api_addr}/v1/profiles?email=ada%40example.org"
                ))
                .bearer_auth("r-secret")
                .send()
                .await?
                .status()
                .as_u16(),
        )
    };
    assert_eq!(lookup().await?, 200);

    // Erase by the phone number alone.
    let requests = cdp_erasure::Requests::open(&ec).await?;
    let id = requests
        .file(&Request {
            identifiers: vec![RawIdentifier::new(IdentifierKind::Phone, "(415) 555-0100")],
            profiles: Vec::new(),
            requested_by: "dpo@example.org".to_owned(),
            reason: Some("Art. 17 request by email".to_owned()),
            suppress: true,
            force: false,
        })
        .await?;
    let done = requests
        .wait_final(id, WAIT)
        .await?
        .ok_or_else(|| anyhow::anyhow!("the erasure did not complete"))?;
    assert_eq!(done.state, "completed");
    assert_eq!(done.outcome.as_deref(), Some("ERASED"));
    assert_eq!(done.tokens, Some(4));
    assert_eq!(done.refused_links, Some(1), "the refused alias is reported");
    assert!(done.keys_destroyed.unwrap_or(0) >= 2, "{done:?}");
    assert_eq!(done.vault_rows, Some(4));
    let services: Vec<&str> = done.answers.iter().map(|a| a.service.as_str()).collect();
    assert_eq!(services, ["identity", "projector"]);

    // Completion means every service's deletions are committed and their tombstones
    // published (the answers leave their outboxes behind them): verify, run at once,
    // finds the person only where they are by design.
    let report = cdp::verify::erasure(&requests, &ec, id, &[], Some(&store)).await?;
    assert!(report.clean(), "{report:?}");
    let store_named = |name: &str| {
        report
            .stores
            .iter()
            .find(|s| s.store == name)
            .cloned()
            .ok_or_else(|| anyhow::anyhow!("{name} not searched: {report:?}"))
    };
    // The log and the archive keep the person's events, naming tokens no vault row leads
    // to, sealed under keys that are gone.
    for name in [
        format!("topic {events_topic}"),
        format!("archive {archive} {events_topic}"),
    ] {
        let s = store_named(&name)?;
        assert!(s.naming >= 4 && s.sealed >= 3, "{s:?}");
        assert_eq!(s.openable, 0, "{s:?}");
    }
    // The latest record of each of their keys on the compacted topics is a tombstone.
    for t in [Topic::Profiles, Topic::Identity] {
        let s = store_named(&format!("topic {}", ing.topic(t)))?;
        assert!(s.naming > 0 && s.found == 0, "{s:?}");
    }
    assert_eq!(
        store_named(&format!("topic {}", ing.topic(Topic::Audit)))?.found,
        0
    );
    assert_eq!((report.tokens, report.live_keys), (4, 0));
    assert!(report.tables_searched >= 30, "{report:?}");
    for table in [
        "public.erased_tokens",
        "public.erased_profiles",
        "public.subject_keys",
        "erasure_t.erasure_requests",
    ] {
        assert!(report.by_design.contains_key(table), "{table}: {report:?}");
    }

    // Nothing of the person is left in any table, and the control person is as it was.
    let after = remains(&pool, LIVE, &profiles, &tokens).await?;
    assert!(after.values().all(|n| *n == 0), "{after:?}");
    assert_eq!(rows_of(&pool, LIVE.0, grace).await?, grace_before);
    // The account identity refused to link is another person, by the rules: it stays.
    assert_eq!(rows_of(&pool, LIVE.0, ada_old).await?, ada_old_before);
    // The email lookup finds no one.
    assert_eq!(lookup().await?, 404);
    api_stop.trigger();
    api.await??;
    for (kind, value) in [
        (IdentifierKind::Email, email),
        (IdentifierKind::Phone, phone),
        (IdentifierKind::UserId, "ada"),
    ] {
        assert!(
            ing.token(kind, value).await.is_err(),
            "the vault no longer knows {kind:?}"
        );
    }
    assert_eq!(done.suppressed, Some(4));
    let suppressed: i64 = sqlx::query_scalar("SELECT count(*) FROM suppressions")
        .fetch_one(&pool)
        .await?;
    assert_eq!(suppressed, 4);

    // The latest record of every key of the person on the compacted topics is a tombstone.
    let profile_keys: BTreeSet<String> = profiles.iter().map(Uuid::to_string).collect();
    let latest = latest_per_key(&ing.topic(Topic::Profiles)).await?;
    assert!(latest.contains_key(&current.to_string()));
    for p in &profile_keys {
        assert_ne!(latest.get(p), Some(&false), "profile {p} has a snapshot");
    }
    assert_eq!(latest.get(&grace.to_string()), Some(&false));
    let identity_keys: BTreeSet<String> = links
        .iter()
        .map(Uuid::to_string)
        .chain(profile_keys.iter().cloned())
        .collect();
    let latest = latest_per_key(&ing.topic(Topic::Identity)).await?;
    for l in &links {
        assert_eq!(latest.get(&l.to_string()), Some(&true), "link {l}");
    }
    let held: Vec<_> = latest
        .iter()
        .filter(|(k, tombstone)| identity_keys.contains(*k) && !**tombstone)
        .collect();
    assert!(held.is_empty(), "{held:?}");

    // A copy of a token anywhere else is found.
    sqlx::query("CREATE TABLE public.leak_check (note BYTEA)")
        .execute(&pool)
        .await?;
    sqlx::query("INSERT INTO public.leak_check VALUES ($1)")
        .bind(format!("copied {}", tokens[0]).into_bytes())
        .execute(&pool)
        .await?;
    let leaked = requests.verify(id, &[]).await?;
    assert!(!leaked.clean());
    assert_eq!(
        leaked.found.into_iter().collect::<Vec<_>>(),
        [("public.leak_check".to_owned(), 1)]
    );
    sqlx::query("DROP TABLE public.leak_check")
        .execute(&pool)
        .await?;
    // So is a record naming the person that still opens: grace's identify (her key is
    // alive) carrying one of the person's tokens, in a topic verify is told to search.
    let leak_topic = format!("{}leak", ing.kafka.topic_prefix);
    cdp_integration_tests::create_topics(&[(&leak_topic, 1)]).await?;
    let grace_token = ing.token(IdentifierKind::UserId, "grace").await?;
    let mut leaked_event = events
        .values()
        .flatten()
        .filter_map(|r| cdp_schemas::decode::<cdp_schemas::CustomerEvent>(r.value.as_deref()?).ok())
        .find(|e| {
            e.envelope.subject.subject_id == grace_token
                && e.payload.pii().iter().any(|(_, s)| s.is_some())
        })
        .ok_or_else(|| anyhow::anyhow!("no sealed event of grace"))?;
    leaked_event
        .envelope
        .subject
        .identifiers
        .push(cdp_schemas::Identifier {
            kind: IdentifierKind::Phone,
            namespace: None,
            token: tokens[0].clone(),
        });
    let leaked_bytes = cdp_schemas::encode(&leaked_event)?;
    cdp_runtime::kafka::producer::Producer::new(&ing.kafka)?
        .send_all(&[cdp_runtime::kafka::producer::OutgoingRecord {
            topic: &leak_topic,
            key: Some(grace_token.as_bytes()),
            value: Some(&leaked_bytes),
            ..Default::default()
        }])
        .await?;
    let leaked =
        cdp::verify::erasure(&requests, &ec, id, std::slice::from_ref(&leak_topic), None).await?;
    assert!(!leaked.clean());
    let s = leaked
        .stores
        .iter()
        .find(|s| s.store == format!("topic {leak_topic}"))
        .ok_or_else(|| anyhow::anyhow!("the leak topic was not searched"))?;
    assert_eq!((s.naming, s.openable), (1, s.sealed), "{s:?}");
    assert!(s.openable > 0);

    // Someone holding every key of the platform, the person's plaintext identifiers and
    // the shop's record of her order finds, in every table, topic and archive file, only
    // the suppression entries: the one thing kept, which names no request, token, profile
    // or record.
    let found = adversary(
        &ing,
        &archive,
        &[
            RawIdentifier::new(IdentifierKind::Email, email),
            RawIdentifier::new(IdentifierKind::Phone, phone),
            RawIdentifier::new(IdentifierKind::Phone, "(415) 555-0100"),
            RawIdentifier::new(IdentifierKind::UserId, "ada"),
            RawIdentifier::new(IdentifierKind::AnonymousId, "anon-ada"),
        ],
        // What the shop's own records say about her order.
        &["ada-order-4711", "ADA-WELCOME-10", "Difference Engine"],
    )
    .await?;
    assert_eq!(
        found,
        BTreeMap::from([(
            "postgres public.suppressions".to_owned(),
            BTreeSet::from(["suppression entry"])
        )]),
    );
    let columns: Vec<String> = sqlx::query_scalar(
        "SELECT column_name::text FROM information_schema.columns
          WHERE table_schema = 'public' AND table_name = 'suppressions'",
    )
    .fetch_all(&pool)
    .await?;
    assert_eq!(columns, ["entry"]);

    // The compliance topic tells the story without a personal value in it (ErasureCompleted
    // is published by the processor's relay after the request turned final).
    wait_until("ErasureCompleted published", WAIT, || async {
        Ok(read_log(&ing.topic(Topic::Compliance))
            .await?
            .values()
            .flatten()
            .any(|r| {
                r.value.as_deref().is_some_and(|v| {
                    cdp_schemas::decode::<ComplianceEvent>(v)
                        .is_ok_and(|e| matches!(e.payload, CompliancePayload::ErasureCompleted(_)))
                })
            }))
    })
    .await?;
    let mut kinds = Vec::new();
    for records in read_log(&ing.topic(Topic::Compliance)).await?.into_values() {
        for r in records {
            let e: ComplianceEvent = cdp_schemas::decode(r.value.as_deref().unwrap_or_default())?;
            assert_eq!(e.payload.request_id(), id);
            let text = format!("{e:?}");
            // (Strings that cannot occur in hex tokens or uuids by chance.)
            for personal in [
                "ada@",
                "anon-ada",
                "4155550100",
                "415 555",
                "dpo@",
                "Art. 17",
            ] {
                assert!(!text.contains(personal), "{personal} in {text}");
            }
            if let CompliancePayload::ErasureCompleted(c) = &e.payload {
                assert_eq!(c.outcome, ErasureOutcome::Erased);
                assert_eq!(c.tokens, 4);
                assert!(c.rows_deleted > 0 && c.tombstones_emitted > 0);
            }
            kinds.push(e.payload.event_type());
        }
    }
    kinds.sort_unstable();
    assert_eq!(
        kinds,
        [
            "compliance.erasure_applied",
            "compliance.erasure_applied",
            "compliance.erasure_completed",
            "compliance.erasure_requested",
            "compliance.erasure_scoped",
        ]
    );

    // The audit topic holds one record of the request: counts in the clear, who asked and
    // why sealed with the request's audit key (published by the processor's relay after
    // the request turned final).
    wait_until("the audit record published", WAIT, || async {
        Ok(read_log(&ing.topic(Topic::Audit))
            .await?
            .values()
            .any(|v| !v.is_empty()))
    })
    .await?;
    let audit: Vec<cdp_schemas::AuditEvent> = read_log(&ing.topic(Topic::Audit))
        .await?
        .into_values()
        .flatten()
        .map(|r| cdp_schemas::decode(r.value.as_deref().unwrap_or_default()))
        .collect::<Result<_, _>>()?;
    assert_eq!(audit.len(), 1, "{audit:?}");
    let cdp_schemas::AuditPayload::ErasureAudited(a) = &audit[0].payload;
    assert_eq!(a.request_id, id);
    assert_eq!(a.outcome, cdp_schemas::model::audit::AuditedOutcome::Erased);
    assert_eq!((a.tokens, a.vault_rows_deleted, a.refused_links), (4, 4, 1));
    assert_eq!(a.services, ["identity", "projector"]);
    assert!(
        a.rows_deleted > 0 && a.stores["projector.customers"] == 1,
        "{a:?}"
    );
    let subject = cdp_schemas::model::audit::audit_subject(id);
    let keys = ing.key_args.key_store(pool.clone())?;
    for (field, sealed, plain) in [
        ("requested_by", &a.requested_by, "dpo@example.org"),
        ("reason", &a.reason, "Art. 17 request by email"),
    ] {
        let sealed = sealed
            .as_ref()
            .ok_or_else(|| anyhow::anyhow!("{field} missing"))?;
        let version = cdp_keystore::crypto::sealed_version(sealed)?;
        let key = keys
            .key(&subject, version)
            .await?
            .ok_or_else(|| anyhow::anyhow!("no audit key"))?;
        let opened = key.open(&cdp_keystore::crypto::field_aad(&subject, field), sealed)?;
        assert_eq!(opened, plain.as_bytes());
    }

    // The person cannot come back: ingest refuses their identifiers.
    let (status, body) = ing
        .post(
            "/v1/identify",
            &json!({"userId": "someone-new", "traits": {"phone": phone}}),
        )
        .await?;
    assert_eq!(status, 400, "{body}");
    // Unless the suppression is lifted: then the email makes a new, unlinked person.
    let lifted =
        cdp_erasure::unsuppress(&ec, &[RawIdentifier::new(IdentifierKind::Email, email)]).await?;
    assert_eq!(lifted, 1);
    let (status, body) = ing
        .post(
            "/v1/identify",
            &json!({"userId": "ada-2", "traits": {"email": email}}),
        )
        .await?;
    assert_eq!(status, 200, "{body}");
    let again = ing.token(IdentifierKind::Email, email).await?;
    assert!(!tokens.contains(&again), "a new token");

    // The request's event delivered again changes nothing: no second scope or completion.
    let compliance = ing.topic(Topic::Compliance);
    let requested = read_log(&compliance)
        .await?
        .into_values()
        .flatten()
        .find(|r| {
            r.value.as_deref().is_some_and(|v| {
                cdp_schemas::decode::<ComplianceEvent>(v)
                    .is_ok_and(|e| matches!(e.payload, CompliancePayload::ErasureRequested(_)))
            })
        })
        .ok_or_else(|| anyhow::anyhow!("no ErasureRequested on the compliance topic"))?;
    let producer = cdp_runtime::kafka::producer::Producer::new(&ing.kafka)?;
    producer
        .send_all(&[cdp_runtime::kafka::producer::OutgoingRecord {
            topic: &compliance,
            key: requested.key.as_deref(),
            value: requested.value.as_deref(),
            ..Default::default()
        }])
        .await?;
    let ends = cdp_integration_tests::topic_ends(&compliance).await?;
    wait_until("the processor read the repeated request", WAIT, || async {
        let stored = cdp_runtime::pg::stored_positions(&pool, &ec.erasure.group).await?;
        Ok(ends.iter().all(|(p, end)| {
            *end == 0
                || stored
                    .get(&cdp_runtime::TopicPartition {
                        topic: compliance.clone(),
                        partition: *p,
                    })
                    .is_some_and(|s| s >= end)
        }))
    })
    .await?;
    let mut steps = BTreeMap::<&str, usize>::new();
    for r in read_log(&compliance).await?.into_values().flatten() {
        let e: ComplianceEvent = cdp_schemas::decode(r.value.as_deref().unwrap_or_default())?;
        *steps.entry(e.payload.event_type()).or_default() += 1;
    }
    assert_eq!(steps["compliance.erasure_requested"], 2);
    assert_eq!(steps["compliance.erasure_scoped"], 1);
    assert_eq!(steps["compliance.erasure_completed"], 1);
    assert_eq!(requests.status(Some(id), 1).await?[0].state, "completed");
    requests.close().await;

    // The person's merges delivered again after the erasure (a restore into the topic, a
    // late duplicate) leave no trace in the read models: the ledger holds their profiles.
    let merges: Vec<_> = read_log(&ing.topic(Topic::Identity))
        .await?
        .into_values()
        .flatten()
        .filter(|r| {
            r.value.as_deref().is_some_and(|v| {
                cdp_schemas::decode::<cdp_schemas::IdentityEvent>(v).is_ok_and(|e| {
                    matches!(&e.payload, cdp_schemas::IdentityPayload::ProfilesMerged(m)
                        if profiles.contains(&m.loser_profile_id))
                })
            })
        })
        .collect();
    assert!(
        !merges.is_empty(),
        "identity merged the visitor into the account"
    );
    let identity_topic = ing.topic(Topic::Identity);
    let again: Vec<_> = merges
        .iter()
        .map(|r| cdp_runtime::kafka::producer::OutgoingRecord {
            topic: &identity_topic,
            key: r.key.as_deref(),
            value: r.value.as_deref(),
            ..Default::default()
        })
        .collect();
    producer.send_all(&again).await?;
    cdp_integration_tests::projector::caught_up(&pool, &pc, WAIT, Duration::from_millis(100))
        .await?;
    let after_merges = remains(&pool, LIVE, &profiles, &tokens).await?;
    assert!(after_merges.values().all(|n| *n == 0), "{after_merges:?}");

    // A replay from earliest brings nobody back: a fresh identity graph and a fresh projector
    // over the same topics (every event of the person is still in the log, sealed under
    // destroyed keys) hold nothing of them, and the control person as before.
    let ic2 = identity_for(&ing.kafka, &ing.db, &ing.key_args, "id_replay");
    cdp_identity::pool(&ic2.pg, &ic2.identity.schema)
        .await?
        .close()
        .await;
    let pc2 = pipeline::projector(&ing, "replay");
    let (stop_i2, task_i2) = cdp_integration_tests::identity::spawn(ic2.clone());
    let (stop_p2, task_p2) = cdp_integration_tests::projector::spawn(pc2.clone());
    cdp_integration_tests::identity::caught_up(
        &pool,
        &ic2,
        &ing.topic(Topic::CustomerEvents),
        WAIT,
    )
    .await?;
    cdp_integration_tests::projector::caught_up(&pool, &pc2, WAIT, Duration::from_millis(100))
        .await?;
    let replayed = remains(&pool, ("p_replay_read", "id_replay"), &profiles, &tokens).await?;
    assert!(replayed.values().all(|n| *n == 0), "{replayed:?}");
    let grace_replayed = rows_of(&pool, "p_replay_read", grace).await?;
    assert_eq!(
        grace_replayed
            .iter()
            .filter(|r| r.starts_with("customers "))
            .count(),
        1,
        "{grace_replayed:?}"
    );
    let graph: i64 = sqlx::query_scalar("SELECT count(*) FROM id_replay.identity_nodes")
        .fetch_one(&pool)
        .await?;
    assert!(
        graph >= 3,
        "grace's, ada-old's and ada-2's identifiers: {graph}"
    );

    // Nor does a restore of the archive into a fresh deployment's topic, projected from
    // scratch: the restored events of the person are skipped like the log's.
    let restored = cdp_runtime::topics::Topics::new(format!("{}restored.", ing.kafka.topic_prefix));
    let mut pc3 = pipeline::projector(&ing, "restored");
    pc3.kafka.topic_prefix = format!("{}restored.", ing.kafka.topic_prefix);
    cdp_runtime::topics::ensure(&pc3.kafka, &cdp_runtime::topics::catalogue(&restored)).await?;
    let summary = cdp_archiver::restore::restore(
        &pc3.kafka,
        &archive,
        &cdp_archiver::restore::RestoreRequest {
            topic: events_topic.clone(),
            partition: None,
            from: None,
            to: None,
            into: restored.name(Topic::CustomerEvents),
            allow_nonempty: false,
        },
        |_| {},
    )
    .await?;
    let archived_events: u64 = events.values().map(|v| v.len() as u64).sum();
    assert!(summary.records >= archived_events, "{summary:?}");
    let (stop_p3, task_p3) = cdp_integration_tests::projector::spawn(pc3.clone());
    cdp_integration_tests::projector::caught_up(&pool, &pc3, WAIT, Duration::from_millis(100))
        .await?;
    let from_archive = remains(&pool, ("p_restored_read", LIVE.1), &profiles, &tokens).await?;
    assert!(from_archive.values().all(|n| *n == 0), "{from_archive:?}");
    let grace_restored = rows_of(&pool, "p_restored_read", grace).await?;
    assert!(
        grace_restored.iter().any(|r| r.starts_with("customers ")),
        "{grace_restored:?}"
    );

    for (stop, task) in [(stop_e, task_e)] {
        stop.trigger();
        task.await??;
    }
    for (stop, task) in [(stop_p2, task_p2), (stop_p3, task_p3)] {
        stop.trigger();
        task.await??;
    }
    stop_a.trigger();
    task_a.await??;
    stop_i2.trigger();
    task_i2.await??;
    stop_p.trigger();
    task_p.await??;
    stop_i.trigger();
    task_i.await??;
    ing.stop().await
}

/// The erasures API files requests for the compliance role only, recording its principal as
/// the requester. A request for an identifier nobody knows completes at once as
/// `NOTHING_FOUND` and still suppresses it; a cluster over the size limit is refused without
/// force and nothing of it changes. Each gets one audit record.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_erasures_api_files_requests_and_the_limit_refuses_large_clusters() -> anyhow::Result<()>
{
    require_broker().await?;
    let ing = Ingest::start_with(Options {
        erasure_propagation_ms: 0,
        ..Options::default()
    })
    .await?;
    // Without identity, a cluster is what the request names: bob's anonymous id and user id
    // are two subjects, two profiles, over a limit of one.
    let (status, body) = ing
        .post(
            "/v1/identify",
            &json!({"anonymousId": "anon-bob", "userId": "bob", "traits": {"firstName": "Bob"}}),
        )
        .await?;
    assert_eq!(status, 200, "{body}");
    let mut ec = pipeline::erasure(&ing, "erasure_t", "no_identity_here");
    ec.erasure.schema = "erasure_api".to_owned();
    ec.erasure.max_profiles = 1;
    let (stop_e, task_e) = pipeline::spawn_erasure(ec.clone());
    let shutdown = cdp_runtime::Shutdown::new();
    let tokens = [
        "dpo:compliance:c-secret".to_owned(),
        "dev:read:r-secret".to_owned(),
    ];
    let (addr, serve) = cdp_erasure::bind_api(
        &ec,
        &cdp_erasure::ErasureApiArgs {
            erasure_api_addr: "127.0.0.1:0".to_owned(),
        },
        &tokens,
        shutdown.clone(),
    )
    .await?
    .ok_or_else(|| anyhow::anyhow!("the API is on"))?;
    let server = tokio::spawn(serve);
    let http = reqwest::Client::new();
    let url = format!("http://{addr}/v1/erasures");
    let file = |body: serde_json::Value, secret: &'static str| {
        let req = http.post(&url).bearer_auth(secret).json(&body);
        async move {
            let r = req.send().await?;
            let status = r.status().as_u16();
            let body: serde_json::Value = r.json().await.unwrap_or_default();
            anyhow::Ok((status, body))
        }
    };
    let nobody = json!({"identifiers": [{"kind": "email", "value": " Nobody@Example.org "}],
                        "reason": "ticket 1"});
    let anonymous = http.post(&url).json(&nobody).send().await?.status();
    assert_eq!(anonymous, 401);
    assert_eq!(file(nobody.clone(), "r-secret").await?.0, 403);
    let bad = json!({"identifiers": [{"kind": "shoe_size", "value": "44"}]});
    assert_eq!(file(bad, "c-secret").await?.0, 400);
    assert_eq!(file(json!({"reason": "nobody"}), "c-secret").await?.0, 400);

    let (status, filed) = file(nobody, "c-secret").await?;
    assert_eq!(status, 202, "{filed}");
    let id: Uuid = filed["request_id"]
        .as_str()
        .ok_or_else(|| anyhow::anyhow!("{filed}"))?
        .parse()?;
    let requests = cdp_erasure::Requests::open(&ec).await?;
    let done = requests
        .wait_final(id, WAIT)
        .await?
        .ok_or_else(|| anyhow::anyhow!("the request did not complete"))?;
    assert_eq!(done.outcome.as_deref(), Some("NOTHING_FOUND"));
    assert_eq!(done.requested_by, "dpo");
    assert_eq!((done.tokens, done.suppressed), (Some(0), Some(1)));
    let got: serde_json::Value = http
        .get(format!("{url}/{id}"))
        .bearer_auth("c-secret")
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(
        (got["state"].as_str(), got["outcome"].as_str()),
        (Some("completed"), Some("NOTHING_FOUND")),
        "{got}"
    );
    // The identifier nobody knew is refused from now on.
    let (status, body) = ing
        .post(
            "/v1/identify",
            &json!({"userId": "someone", "traits": {"email": "nobody@example.org"}}),
        )
        .await?;
    assert_eq!(status, 400, "{body}");

    // Bob's cluster is over the limit: refused, and nothing of him changes.
    let bob = json!({"identifiers": [{"kind": "user_id", "value": "bob"},
                                     {"kind": "anonymous_id", "value": "anon-bob"}]});
    let (status, filed) = file(bob, "c-secret").await?;
    assert_eq!(status, 202, "{filed}");
    let refused_id: Uuid = filed["request_id"]
        .as_str()
        .ok_or_else(|| anyhow::anyhow!("{filed}"))?
        .parse()?;
    let refused = requests
        .wait_final(refused_id, WAIT)
        .await?
        .ok_or_else(|| anyhow::anyhow!("the request was not decided"))?;
    assert_eq!(refused.state, "refused");
    assert_eq!(refused.outcome.as_deref(), Some("REFUSED_TOO_LARGE"));
    assert_eq!(refused.profiles, Some(2));
    assert_eq!(refused.keys_destroyed, None, "nothing was shredded");
    ing.token(IdentifierKind::UserId, "bob").await?;
    let (status, body) = ing
        .post(
            "/v1/track",
            &json!({"userId": "bob", "event": "Still Here"}),
        )
        .await?;
    assert_eq!(status, 200, "{body}");

    let unknown = http
        .get(format!("{url}/{}", Uuid::now_v7()))
        .bearer_auth("c-secret")
        .send()
        .await?
        .status();
    assert_eq!(unknown, 404);

    // One audit record per decided request. A request's row turns final in the transaction
    // that puts its records in the processor's outbox; the relay publishes them a moment
    // later.
    let audited = || async {
        let mut audited: Vec<(Uuid, ErasureOutcome)> = read_log(&ing.topic(Topic::Audit))
            .await?
            .into_values()
            .flatten()
            .map(|r| {
                let e: cdp_schemas::AuditEvent =
                    cdp_schemas::decode(r.value.as_deref().unwrap_or_default())?;
                let cdp_schemas::AuditPayload::ErasureAudited(a) = e.payload;
                anyhow::Ok((a.request_id, a.outcome))
            })
            .collect::<Result<_, _>>()?;
        audited.sort_by_key(|(id, _)| *id);
        anyhow::Ok(audited)
    };
    wait_until("both audit records published", WAIT, || async {
        Ok(audited().await?.len() >= 2)
    })
    .await?;
    let mut expected = vec![
        (id, ErasureOutcome::NothingFound),
        (refused_id, ErasureOutcome::RefusedTooLarge),
    ];
    expected.sort_by_key(|(id, _)| *id);
    assert_eq!(audited().await?, expected);

    requests.close().await;
    shutdown.trigger();
    server.await??;
    stop_e.trigger();
    task_e.await??;
    ing.stop().await
}

/// A service of the crash test, as a process it SIGKILLs and restarts.
struct Probe {
    name: &'static str,
    command: std::process::Command,
    child: std::process::Child,
}

impl Probe {
    fn start(name: &'static str, mut command: std::process::Command) -> anyhow::Result<Self> {
        command.stdin(std::process::Stdio::null());
        let child = command.spawn()?;
        Ok(Self {
            name,
            command,
            child,
        })
    }

    fn kill_and_restart(&mut self) -> anyhow::Result<()> {
        self.child.kill()?;
        self.child.wait()?;
        self.child = self.command.spawn()?;
        Ok(())
    }

    /// Fails when the process exited by itself (it must only die when killed).
    fn alive(&mut self) -> anyhow::Result<()> {
        match self.child.try_wait()? {
            None => Ok(()),
            Some(status) => anyhow::bail!("{} exited by itself: {status}", self.name),
        }
    }
}

impl Drop for Probe {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn probe_command(ing: &Ingest, binary: &str) -> std::process::Command {
    let mut c = std::process::Command::new(binary);
    c.env("CDP_KAFKA_BROKERS", cdp_integration_tests::brokers())
        .env("CDP_TOPIC_PREFIX", &ing.kafka.topic_prefix)
        .env("CDP_DATABASE_URL", &ing.db.url)
        .env("CDP_MASTER_KEY", &ing.key_args.master_key)
        .env("CDP_IDENTIFIER_KEY", &ing.key_args.identifier_key)
        .env("CDP_BATCH_SIZE", "100")
        .env(
            "CDP_KAFKA_PROPERTIES",
            "session.timeout.ms=6000,heartbeat.interval.ms=500",
        );
    c
}

/// Thirty people erased one after another while the processor, identity and the projector
/// are SIGKILLed at random moments and restarted: every request completes exactly once (one
/// `ErasureScoped`, one `ErasureCompleted`, one audit record each), verify finds nothing of
/// any of them, ingest (another process than the processor) refuses their identifiers, and
/// the people nobody asked to erase are all there.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_of_the_processor_and_the_services_during_erasures_completes_each_once(
) -> anyhow::Result<()> {
    use rand::{Rng, SeedableRng};
    cdp_integration_tests::log_from_env()?;
    require_broker().await?;
    const PEOPLE: usize = 40;
    const ERASED: usize = 30;
    let ing = Ingest::start_with(Options {
        erasure_propagation_ms: 0,
        ..Options::default()
    })
    .await?;
    let mut batch = Vec::new();
    for i in 0..PEOPLE {
        batch.push(
            json!({"type": "page", "anonymousId": format!("anon-{i}"), "name": "Home",
                          "messageId": format!("p{i}")}),
        );
        batch.push(
            json!({"type": "identify", "anonymousId": format!("anon-{i}"),
                          "userId": format!("user-{i}"),
                          "traits": {"email": format!("person{i}@example.org"), "firstName": "P"},
                          "messageId": format!("i{i}")}),
        );
        batch.push(
            json!({"type": "track", "userId": format!("user-{i}"), "event": "Signed In",
                          "messageId": format!("t{i}")}),
        );
    }
    let (status, body) = ing.post("/v1/batch", &json!({ "batch": batch })).await?;
    assert_eq!(status, 200, "{body}");

    let ic = identity_for(&ing.kafka, &ing.db, &ing.key_args, "id_crash");
    let pc = pipeline::projector(&ing, "crash");
    let mut ec = pipeline::erasure(&ing, "erasure_t", "id_crash");
    ec.erasure.schema = "erasure_crash".to_owned();
    // Schemas and tables exist before the helpers read them.
    cdp_integration_tests::identity::create_graph(&ic).await?;
    let mut identity = probe_command(&ing, env!("CARGO_BIN_EXE_identity-probe"));
    identity
        .env("CDP_IDENTITY_GROUP", &ic.identity.group)
        .env("CDP_IDENTITY_SCHEMA", &ic.identity.schema);
    let mut projector = probe_command(&ing, env!("CARGO_BIN_EXE_projector-probe"));
    projector
        .env("CDP_PROJECTOR_GROUP", &pc.projector.group)
        .env("CDP_PROJECTOR_SCHEMA", &pc.projector.schema_prefix);
    let mut processor = probe_command(&ing, env!("CARGO_BIN_EXE_erasure-probe"));
    processor
        .env("CDP_ERASURE_GROUP", &ec.erasure.group)
        .env("CDP_ERASURE_SCHEMA", &ec.erasure.schema)
        .env("CDP_IDENTITY_SCHEMA", &ic.identity.schema)
        .env("CDP_ERASURE_SERVICES", "projector,identity")
        // A request whose event a killed service's restart skipped would be asked again.
        .env("CDP_ERASURE_REASK_SECS", "20");
    let mut probes = vec![
        Probe::start("identity", identity)?,
        Probe::start("projector", projector)?,
        Probe::start("processor", processor)?,
    ];
    let pool = ing.db.pool.clone();
    cdp_integration_tests::identity::caught_up(&pool, &ic, &ing.topic(Topic::CustomerEvents), WAIT)
        .await?;
    cdp_integration_tests::projector::caught_up(&pool, &pc, WAIT, Duration::from_millis(100))
        .await?;
    let mut kept = Vec::new();
    let mut kept_before = Vec::new();
    for i in ERASED..PEOPLE {
        let token = ing
            .token(IdentifierKind::UserId, &format!("user-{i}"))
            .await?;
        // The profile identity merged the visitor and the account into.
        let profile: Uuid =
            sqlx::query_scalar("SELECT profile_id FROM id_crash.identity_nodes WHERE token = $1")
                .bind(&token)
                .fetch_one(&pool)
                .await?;
        kept_before.push(rows_of(&pool, "p_crash_read", profile).await?);
        kept.push(profile);
    }
    assert!(
        kept_before.iter().all(|rows| rows.len() >= 3),
        "{kept_before:?}"
    );

    // File the requests one by one, killing a random service now and then.
    let requests = cdp_erasure::Requests::open(&ec).await?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(25);
    let mut ids = Vec::new();
    let mut kills = BTreeMap::<&str, usize>::new();
    for i in 0..ERASED {
        ids.push(
            requests
                .file(&Request {
                    identifiers: vec![RawIdentifier::new(
                        IdentifierKind::Email,
                        format!("person{i}@example.org"),
                    )],
                    profiles: Vec::new(),
                    requested_by: "dpo@example.org".to_owned(),
                    reason: Some("crash test".to_owned()),
                    suppress: true,
                    force: false,
                })
                .await?,
        );
        tokio::time::sleep(Duration::from_millis(rng.random_range(50..400))).await;
        if rng.random_bool(0.5) {
            let p = &mut probes[rng.random_range(0..3)];
            p.alive()?;
            p.kill_and_restart()?;
            *kills.entry(p.name).or_default() += 1;
        }
    }
    assert!(kills.len() == 3, "every service was killed: {kills:?}");
    let mut reports = Vec::new();
    for id in &ids {
        let done = requests
            .wait_final(*id, WAIT)
            .await?
            .ok_or_else(|| anyhow::anyhow!("request {id} did not complete (kills: {kills:?})"))?;
        assert_eq!(
            (done.state.as_str(), done.outcome.as_deref()),
            ("completed", Some("ERASED")),
            "{done:?}"
        );
        reports.push(requests.verify(*id, &[]).await?);
    }
    for r in &reports {
        assert!(r.clean(), "{r:?}");
    }
    for p in &mut probes {
        p.alive()?;
    }

    // The processor's relay publishes what the last transactions put in its outbox.
    wait_until("every audit record published", WAIT, || async {
        let n: usize = read_log(&ing.topic(Topic::Audit))
            .await?
            .values()
            .map(Vec::len)
            .sum();
        Ok(n >= ERASED)
    })
    .await?;
    // Exactly once: per request one scope, one completion, one audit record (a request
    // asked again would show a second scope with the same event id, never a second
    // completion).
    let mut steps = BTreeMap::<(Uuid, &str), BTreeSet<Uuid>>::new();
    let mut copies = BTreeMap::<(Uuid, &str), usize>::new();
    for r in read_log(&ing.topic(Topic::Compliance))
        .await?
        .into_values()
        .flatten()
    {
        let e: ComplianceEvent = cdp_schemas::decode(r.value.as_deref().unwrap_or_default())?;
        let key = (e.payload.request_id(), e.payload.event_type());
        steps.entry(key).or_default().insert(e.envelope.event_id);
        *copies.entry(key).or_default() += 1;
    }
    for id in &ids {
        for step in ["compliance.erasure_scoped", "compliance.erasure_completed"] {
            assert_eq!(
                steps.get(&(*id, step)).map(BTreeSet::len),
                Some(1),
                "{step} of {id}"
            );
        }
        assert_eq!(
            copies.get(&(*id, "compliance.erasure_completed")),
            Some(&1),
            "one ErasureCompleted record for {id}"
        );
    }
    let audited: Vec<Uuid> = read_log(&ing.topic(Topic::Audit))
        .await?
        .into_values()
        .flatten()
        .map(|r| {
            let e: cdp_schemas::AuditEvent =
                cdp_schemas::decode(r.value.as_deref().unwrap_or_default())?;
            let cdp_schemas::AuditPayload::ErasureAudited(a) = e.payload;
            Ok(a.request_id)
        })
        .collect::<anyhow::Result<_>>()?;
    assert_eq!(audited.len(), ERASED, "one audit record per request");
    assert_eq!(
        audited.iter().collect::<BTreeSet<_>>().len(),
        ERASED,
        "{audited:?}"
    );

    // The processor is another process than ingest (other caches of keys and tokens):
    // ingest refuses every erased person's identifiers all the same, and still takes others.
    for i in 0..ERASED {
        let (status, body) = ing
            .post(
                "/v1/identify",
                &json!({"userId": format!("returning-{i}"),
                        "traits": {"email": format!("person{i}@example.org")}}),
            )
            .await?;
        assert_eq!(status, 400, "person {i}: {body}");
    }
    let (status, body) = ing
        .post(
            "/v1/identify",
            &json!({"userId": "someone-new", "traits": {"email": "new@example.org"}}),
        )
        .await?;
    assert_eq!(status, 200, "{body}");

    // Everyone else is as they were.
    for (p, before) in kept.iter().zip(&kept_before) {
        assert_eq!(&rows_of(&pool, "p_crash_read", *p).await?, before);
    }
    eprintln!("kills: {kills:?}");
    requests.close().await;
    drop(probes);
    ing.stop().await
}

/// An erasure filed while the projector rebuilds into a new generation leaves the new
/// generation clean once it is swapped in, and a later erasure also scrubs the retired
/// generation (kept for rollback, consumed by nobody).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_erasure_during_a_projector_rebuild_leaves_every_generation_clean() -> anyhow::Result<()>
{
    cdp_integration_tests::log_from_env()?;
    require_broker().await?;
    let ing = Ingest::start_with(Options {
        erasure_propagation_ms: 0,
        ..Options::default()
    })
    .await?;
    // Two people to erase, a control person, and enough of everyone else's traffic that
    // a rebuild takes a while.
    let mut batch = Vec::new();
    for who in ["ada", "bob", "grace"] {
        batch.push(
            json!({"type": "identify", "anonymousId": format!("anon-{who}"),
                          "userId": who, "traits": {"email": format!("{who}@example.org")}}),
        );
        batch.push(json!({"type": "track", "userId": who, "event": "Signed In"}));
    }
    let (status, body) = ing.post("/v1/batch", &json!({ "batch": batch })).await?;
    assert_eq!(status, 200, "{body}");
    for chunk in 0..20 {
        let filler: Vec<_> = (0..1_000)
            .map(|i| {
                json!({"type": "track", "userId": format!("u{}", (chunk * 1_000 + i) % 2_000),
                            "event": "Product Viewed", "properties": {"sku": "x"}})
            })
            .collect();
        let (status, body) = ing.post("/v1/batch", &json!({ "batch": filler })).await?;
        assert_eq!(status, 200, "{body}");
    }

    let ic = identity_for(&ing.kafka, &ing.db, &ing.key_args, "id_rb");
    cdp_integration_tests::identity::create_graph(&ic).await?;
    let pc = pipeline::projector(&ing, "rb");
    let mut ec = pipeline::erasure(&ing, "erasure_t", "id_rb");
    ec.erasure.schema = "erasure_rb".to_owned();
    let (stop_i, task_i) = cdp_integration_tests::identity::spawn(ic.clone());
    let (stop_p, task_p) = cdp_integration_tests::projector::spawn(pc.clone());
    let (stop_e, task_e) = pipeline::spawn_erasure(ec.clone());
    let pool = ing.db.pool.clone();
    cdp_integration_tests::identity::caught_up(&pool, &ic, &ing.topic(Topic::CustomerEvents), WAIT)
        .await?;
    cdp_integration_tests::projector::caught_up(&pool, &pc, WAIT, Duration::from_millis(100))
        .await?;
    let person = |who: &'static str| {
        let ing = &ing;
        let pool = &pool;
        async move {
            let mut tokens = Vec::new();
            for (kind, value) in [
                (IdentifierKind::UserId, who.to_owned()),
                (IdentifierKind::AnonymousId, format!("anon-{who}")),
                (IdentifierKind::Email, format!("{who}@example.org")),
            ] {
                tokens.push(ing.token(kind, &value).await?);
            }
            let profiles: Vec<Uuid> = sqlx::query_scalar(
                "SELECT DISTINCT profile_id FROM id_rb.identity_nodes WHERE token = ANY($1)",
            )
            .bind(&tokens)
            .fetch_all(pool)
            .await?;
            let mut profiles: BTreeSet<Uuid> = profiles.into_iter().collect();
            profiles.extend(tokens.iter().map(|t| cdp_schemas::profile_id_of(t)));
            Ok::<_, anyhow::Error>((profiles.into_iter().collect::<Vec<_>>(), tokens))
        }
    };
    let (ada_profiles, ada_tokens) = person("ada").await?;
    let (bob_profiles, bob_tokens) = person("bob").await?;
    let grace: Uuid =
        sqlx::query_scalar("SELECT profile_id FROM id_rb.identity_nodes WHERE token = $1")
            .bind(ing.token(IdentifierKind::UserId, "grace").await?)
            .fetch_one(&pool)
            .await?;
    let grace_before = rows_of(&pool, "p_rb_read", grace).await?;
    assert!(!grace_before.is_empty());

    // Rebuild from earliest; erase ada while generation 2 is building.
    let rebuild = tokio::spawn(cdp_projector::rebuild(
        pc.clone(),
        cdp_projector::ReplayFrom::Earliest,
        cdp_runtime::Shutdown::new(),
    ));
    let generation_state = |n: i32| {
        let pool = &pool;
        async move {
            let s: Option<String> = sqlx::query_scalar(
                "SELECT state FROM projector_generations WHERE prefix = 'p_rb' AND generation = $1",
            )
            .bind(n)
            .fetch_optional(pool)
            .await?;
            Ok::<_, anyhow::Error>(s)
        }
    };
    wait_until("generation 2 building", WAIT, || async {
        Ok(generation_state(2).await?.as_deref() == Some("building"))
    })
    .await?;
    let requests = cdp_erasure::Requests::open(&ec).await?;
    let erase = |who: &str| Request {
        identifiers: vec![RawIdentifier::new(
            IdentifierKind::Email,
            format!("{who}@example.org"),
        )],
        profiles: Vec::new(),
        requested_by: "dpo@example.org".to_owned(),
        reason: None,
        suppress: true,
        force: false,
    };
    let ada = requests.file(&erase("ada")).await?;
    assert_eq!(
        generation_state(2).await?.as_deref(),
        Some("building"),
        "the request was filed during the rebuild"
    );
    let done = requests
        .wait_final(ada, WAIT)
        .await?
        .ok_or_else(|| anyhow::anyhow!("ada's erasure did not complete"))?;
    assert_eq!(done.state, "completed");
    let rebuilt = rebuild.await??;
    assert_eq!(rebuilt.generation, 2);
    // The watcher moves the running projector to generation 2; it reads what is left of
    // the compliance topic there.
    cdp_integration_tests::projector::caught_up(&pool, &pc, WAIT, Duration::from_millis(100))
        .await?;
    for schema in ["p_rb_read", "p_rb_g1", "p_rb_g2"] {
        let left = remains(&pool, (schema, "id_rb"), &ada_profiles, &ada_tokens).await?;
        assert!(left.values().all(|n| *n == 0), "ada in {schema}: {left:?}");
    }
    assert_eq!(rows_of(&pool, "p_rb_read", grace).await?, grace_before);

    // After the swap, an erasure reaches the retired generation too.
    let bob = requests.file(&erase("bob")).await?;
    let done = requests
        .wait_final(bob, WAIT)
        .await?
        .ok_or_else(|| anyhow::anyhow!("bob's erasure did not complete"))?;
    assert_eq!(done.state, "completed");
    // The answer that completed it is the live generation's; the retired one was scrubbed by
    // it, or by the projector still running the retired one when the request came (which
    // answers as projector.g1, recorded and not awaited).
    assert!(
        done.answers.iter().any(|a| a.service == "projector"),
        "no answer of the projector: {done:?}"
    );
    for schema in ["p_rb_read", "p_rb_g1"] {
        let left = remains(&pool, (schema, "id_rb"), &bob_profiles, &bob_tokens).await?;
        assert!(left.values().all(|n| *n == 0), "bob in {schema}: {left:?}");
    }
    assert!(requests.verify(bob, &[]).await?.clean());
    requests.close().await;
    for (stop, task) in [(stop_e, task_e)] {
        stop.trigger();
        task.await??;
    }
    stop_p.trigger();
    task_p.await??;
    stop_i.trigger();
    task_i.await??;
    ing.stop().await
}

/// Every record of `topics` on the broker of `kafka`, as (key, is a tombstone).
async fn every_record(
    kafka: &cdp_runtime::config::KafkaArgs,
    topics: Vec<String>,
) -> anyhow::Result<Vec<(String, bool)>> {
    let kafka = kafka.clone();
    tokio::task::spawn_blocking(move || {
        let mut out = Vec::new();
        cdp_runtime::replay::scan(&kafka, &topics, Duration::from_secs(30), |r| {
            out.push((
                String::from_utf8_lossy(r.key.as_deref().unwrap_or_default()).into_owned(),
                r.value.is_none(),
            ))
        })?;
        Ok(out)
    })
    .await?
}

/// On a broker of the test's own that compacts every second (sqlite storage, its
/// maintenance task), an erased person's older records on the compacted topics (profile
/// snapshots, identity links and merges) are physically gone: only their tombstones are
/// left, while the control person's latest snapshot stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_broker_compacts_away_an_erased_persons_older_records() -> anyhow::Result<()> {
    cdp_integration_tests::log_from_env()?;
    let broker =
        cdp_integration_tests::OwnBroker::start_with("sqlite://broker.db?maintenance_interval=1s")?;
    let ing = Ingest::start_with(Options {
        brokers: broker.brokers(),
        erasure_propagation_ms: 0,
        ..Options::default()
    })
    .await?;
    let batch = json!({"batch": [
        {"type": "page", "anonymousId": "anon-ada", "name": "Home"},
        {"type": "identify", "anonymousId": "anon-ada", "userId": "ada",
         "traits": {"email": "ada@example.org", "firstName": "Ada"}},
        {"type": "track", "userId": "ada", "event": "Signed In"},
        {"type": "identify", "userId": "grace", "traits": {"email": "grace@example.org"}},
    ]});
    let (status, body) = ing.post("/v1/batch", &batch).await?;
    assert_eq!(status, 200, "{body}");
    let ic = identity_for(&ing.kafka, &ing.db, &ing.key_args, "id_cmp");
    cdp_integration_tests::identity::create_graph(&ic).await?;
    let pc = pipeline::projector(&ing, "cmp");
    let mut ec = pipeline::erasure(&ing, "erasure_t", "id_cmp");
    ec.erasure.schema = "erasure_cmp".to_owned();
    let (stop_i, task_i) = cdp_integration_tests::identity::spawn(ic.clone());
    let (stop_p, task_p) = cdp_integration_tests::projector::spawn(pc.clone());
    let (stop_e, task_e) = pipeline::spawn_erasure(ec.clone());
    let pool = ing.db.pool.clone();
    let (profiles_topic, identity_topic) = (ing.topic(Topic::Profiles), ing.topic(Topic::Identity));
    let ada_tokens = [
        ing.token(IdentifierKind::AnonymousId, "anon-ada").await?,
        ing.token(IdentifierKind::UserId, "ada").await?,
        ing.token(IdentifierKind::Email, "ada@example.org").await?,
    ];
    let grace = cdp_schemas::profile_id_of(&ing.token(IdentifierKind::UserId, "grace").await?);
    // Identity merged the visitor into the account, the projector published both people.
    let mut ada_keys = BTreeSet::new();
    wait_until("the merge and both snapshots published", WAIT, || async {
        let records = every_record(
            &ing.kafka,
            vec![profiles_topic.clone(), identity_topic.clone()],
        )
        .await?;
        let (merged,): (i64,) = sqlx::query_as(
            "SELECT count(DISTINCT profile_id) FROM id_cmp.identity_nodes WHERE token = ANY($1)",
        )
        .bind(&ada_tokens[..])
        .fetch_one(&pool)
        .await?;
        let grace_key = grace.to_string();
        Ok(merged == 1 && records.iter().any(|(k, t)| *k == grace_key && !t))
    })
    .await?;
    let links: Vec<Uuid> = sqlx::query_scalar(
        "SELECT l.link_id FROM id_cmp.identity_links l JOIN id_cmp.identity_nodes n
             ON n.node_id IN (l.from_node, l.to_node) WHERE n.token = ANY($1)",
    )
    .bind(&ada_tokens[..])
    .fetch_all(&pool)
    .await?;
    let current: Vec<Uuid> = sqlx::query_scalar(
        "SELECT DISTINCT profile_id FROM id_cmp.identity_nodes WHERE token = ANY($1)",
    )
    .bind(&ada_tokens[..])
    .fetch_all(&pool)
    .await?;
    ada_keys.extend(links.iter().chain(&current).map(Uuid::to_string));
    ada_keys.extend(
        ada_tokens
            .iter()
            .map(|t| cdp_schemas::profile_id_of(t).to_string()),
    );
    let before = every_record(
        &ing.kafka,
        vec![profiles_topic.clone(), identity_topic.clone()],
    )
    .await?;
    assert!(
        before.iter().any(|(k, t)| ada_keys.contains(k) && !t),
        "the person has records to compact away: {before:?}"
    );

    let requests = cdp_erasure::Requests::open(&ec).await?;
    let id = requests
        .file(&Request {
            identifiers: vec![RawIdentifier::new(IdentifierKind::Email, "ada@example.org")],
            profiles: Vec::new(),
            requested_by: "dpo@example.org".to_owned(),
            reason: None,
            suppress: true,
            force: false,
        })
        .await?;
    let done = requests
        .wait_final(id, WAIT)
        .await?
        .ok_or_else(|| anyhow::anyhow!("the erasure did not complete"))?;
    assert_eq!(done.state, "completed");
    wait_until(
        "only tombstones left of the person on the compacted topics",
        WAIT,
        || async {
            let records = every_record(
                &ing.kafka,
                vec![profiles_topic.clone(), identity_topic.clone()],
            )
            .await?;
            let grace_key = grace.to_string();
            Ok(records
                .iter()
                .filter(|(k, _)| ada_keys.contains(k))
                .all(|(_, tombstone)| *tombstone)
                && records.iter().any(|(k, t)| ada_keys.contains(k) && *t)
                && records.iter().any(|(k, t)| *k == grace_key && !t))
        },
    )
    .await?;
    requests.close().await;
    for (stop, task) in [(stop_e, task_e)] {
        stop.trigger();
        task.await??;
    }
    stop_p.trigger();
    task_p.await??;
    stop_i.trigger();
    task_i.await??;
    ing.stop().await?;
    drop(broker);
    Ok(())
}
