//! The projector against the real broker and Postgres.

use std::time::Duration;

use cdp_integration_tests::projector::{spawn, Slice};
use cdp_integration_tests::*;
use cdp_runtime::topics::Topic;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replaying_from_earliest_rebuilds_the_same_models_and_duplicates_change_nothing(
) -> anyhow::Result<()> {
    let slice = Slice::create().await?;
    let events = slice.prepare(0..3_000, 199).await?;
    slice.produce(&events, |_| None).await?;
    let config = slice.config("live");
    let (stop, task) = spawn(config.clone());
    slice.caught_up(&config, Duration::from_secs(120)).await?;
    let live = slice.digest(&config).await?;
    let (customers,): (i64,) = sqlx::query_as("SELECT count(*) FROM p_live_read.customers")
        .fetch_one(&slice.db.pool)
        .await?;
    assert_eq!(customers, 199, "one profile per subject");
    let (pii,): (i64,) = sqlx::query_as("SELECT count(*) FROM p_live_read.customer_360 WHERE email LIKE 'user-%@example.org' AND first_name LIKE 'Name%'")
        .fetch_one(&slice.db.pool)
        .await?;
    assert_eq!(pii, 199, "PII opened into the read model");

    // Redelivery of already-applied events (same event ids) changes nothing.
    slice.produce(&events[..500], |_| None).await?;
    slice.caught_up(&config, Duration::from_secs(60)).await?;
    assert_eq!(
        slice.digest(&config).await?,
        live,
        "duplicates have no effect"
    );

    // Rebuild from earliest into a new generation: same digest, swapped in.
    let rebuilt = cdp_projector::rebuild(
        config.clone(),
        cdp_projector::ReplayFrom::Earliest,
        cdp_runtime::Shutdown::new(),
    )
    .await?;
    assert_eq!(rebuilt.digest, live);
    assert_eq!(rebuilt.generation, 2);
    assert_eq!(
        slice.digest(&config).await?,
        live,
        "the read views point at the rebuilt generation"
    );
    // The running projector moves to the new generation and carries on.
    slice
        .produce(&slice.prepare(3_000..3_100, 199).await?, |_| None)
        .await?;
    slice.caught_up(&config, Duration::from_secs(60)).await?;
    let (n,): (i64,) = sqlx::query_as("SELECT count(*) FROM p_live_g2.interactions")
        .fetch_one(&slice.db.pool)
        .await?;
    assert!(
        n > 1_200,
        "new events land in generation 2 ({n} interactions)"
    );
    stop.trigger();
    task.await??;
    let _ = Topic::Profiles;
    slice.db.drop_db().await
}

fn probe(
    slice: &Slice,
    config: &cdp_projector::ProjectorConfig,
) -> anyhow::Result<std::process::Child> {
    Ok(
        std::process::Command::new(env!("CARGO_BIN_EXE_projector-probe"))
            .env("CDP_KAFKA_BROKERS", brokers())
            .env("CDP_TOPIC_PREFIX", &config.kafka.topic_prefix)
            .env("CDP_DATABASE_URL", &slice.db.url)
            .env("CDP_MASTER_KEY", &slice.key_args.master_key)
            .env("CDP_IDENTIFIER_KEY", &slice.key_args.identifier_key)
            .env("CDP_PROJECTOR_GROUP", &config.projector.group)
            .env("CDP_PROJECTOR_SCHEMA", &config.projector.schema_prefix)
            .env("CDP_BATCH_SIZE", "200")
            // Batches grow while the probe catches up after a kill; capped so a run still
            // crosses many commits.
            .env("CDP_BATCH_SIZE_MAX", "2000")
            .env(
                "CDP_KAFKA_PROPERTIES",
                "session.timeout.ms=6000,heartbeat.interval.ms=500",
            )
            .stdin(std::process::Stdio::null())
            .spawn()?,
    )
}

/// Waits until the profiles topic holds a record that `wanted` accepts.
async fn published(
    profiles: &str,
    what: &str,
    wanted: impl Fn(&Consumed) -> bool,
) -> anyhow::Result<()> {
    wait_until(what, Duration::from_secs(60), || async {
        let n = topic_len(profiles).await? as usize;
        let recs = consume(profiles, n, Duration::from_secs(30)).await?;
        Ok(recs.iter().any(&wanted))
    })
    .await
}

/// Waits until the profiles topic holds a tombstone for `profile`.
async fn tombstone_published(profiles: &str, profile: uuid::Uuid) -> anyhow::Result<()> {
    let key = profile.to_string();
    published(profiles, "the profile's tombstone", |r| {
        r.key.as_deref() == Some(key.as_bytes()) && r.value.is_none()
    })
    .await
}

async fn applied(slice: &Slice, config: &cdp_projector::ProjectorConfig) -> anyhow::Result<i64> {
    let Some(g) =
        cdp_projector::generation::live(&slice.db.pool, &config.projector.schema_prefix).await?
    else {
        return Ok(0);
    };
    let stored =
        cdp_runtime::pg::stored_positions(&slice.db.pool, &g.group(&config.projector.group))
            .await?;
    Ok(stored.values().sum())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_at_random_moments_gives_the_same_models_as_an_uninterrupted_run(
) -> anyhow::Result<()> {
    use rand::Rng;
    const N: u64 = 50_000;
    let slice = Slice::create().await?;
    let events = slice.prepare(0..N, 1_999).await?;
    slice.produce(&events, |i| Some((i % 6) as i32)).await?;

    let reference = slice.config("reference");
    let (stop, task) = spawn(reference.clone());
    slice
        .caught_up(&reference, Duration::from_secs(240))
        .await?;
    stop.trigger();
    task.await??;
    let want = slice.digest(&reference).await?;

    let killed = slice.config("killed");
    let mut rng = rand::rng();
    // Up to 80% of the events, looked for every 10 ms: the projector applies thousands of
    // events in the time a coarser poll and the random delay take, so a later point could
    // let it finish before the kill.
    let mut points: Vec<i64> = (0..6)
        .map(|_| rng.random_range(2_000..(N as i64) * 8 / 10))
        .collect();
    points.sort_unstable();
    for (i, point) in points.iter().enumerate() {
        let mut child = probe(&slice, &killed)?;
        wait_until_every(
            &format!("{point} applied before kill {}", i + 1),
            Duration::from_secs(240),
            Duration::from_millis(10),
            || async { Ok(applied(&slice, &killed).await? >= *point) },
        )
        .await?;
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..60))).await;
        child.kill()?;
        child.wait()?;
        let done = applied(&slice, &killed).await?;
        eprintln!(
            "kill {}: SIGKILL at >= {point} applied; {done} after",
            i + 1
        );
        assert!(done < N as i64, "finished before kill {}", i + 1);
    }
    let mut child = probe(&slice, &killed)?;
    slice.caught_up(&killed, Duration::from_secs(240)).await?;
    child.kill()?;
    child.wait()?;
    assert_eq!(
        slice.digest(&killed).await?,
        want,
        "six SIGKILLs change nothing in the read models"
    );
    slice.db.drop_db().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_events_in_another_order_give_identical_profiles() -> anyhow::Result<()> {
    let slice = Slice::create().await?;
    let events = slice.prepare(0..2_000, 97).await?;
    // Forward, one partition each topic.
    slice.produce(&events, |_| Some(0)).await?;
    let forward = slice.config("forward");
    let (stop, task) = spawn(forward.clone());
    slice.caught_up(&forward, Duration::from_secs(120)).await?;
    stop.trigger();
    task.await??;

    // The same records, reversed and spread over partitions, on a second set of topics.
    let prefix2 = format!("{}.", unique("proj-rev"));
    let mut kafka2 = slice.kafka.clone();
    kafka2.topic_prefix = prefix2.clone();
    let topics2 = cdp_runtime::topics::Topics::new(&prefix2);
    cdp_runtime::topics::ensure(&kafka2, &cdp_runtime::topics::catalogue(&topics2)).await?;
    let mut reversed = events.clone();
    reversed.reverse();
    for p in &mut reversed {
        p.topic = p.topic.replacen(&slice.kafka.topic_prefix, &prefix2, 1);
    }
    slice.produce(&reversed, |i| Some((i % 6) as i32)).await?;
    let mut backward = slice.config("backward");
    backward.kafka = kafka2;
    let (stop, task) = spawn(backward.clone());
    let marks_ok = wait_until(
        "the reversed run caught up",
        Duration::from_secs(120),
        || async {
            let Some(g) = cdp_projector::generation::live(&slice.db.pool, "p_backward").await?
            else {
                return Ok(false);
            };
            let stored = cdp_runtime::pg::stored_positions(
                &slice.db.pool,
                &g.group(&backward.projector.group),
            )
            .await?;
            Ok(stored.values().sum::<i64>() >= events.len() as i64)
        },
    )
    .await;
    stop.trigger();
    task.await??;
    marks_ok?;
    assert_eq!(
        slice.digest(&backward).await?,
        slice.digest(&forward).await?,
        "arrival order does not matter"
    );
    let (a,): (String,) = sqlx::query_as("SELECT md5(string_agg(x::text, ',' ORDER BY x.profile_id)) FROM p_forward_read.customer_360 x").fetch_one(&slice.db.pool).await?;
    let (b,): (String,) = sqlx::query_as("SELECT md5(string_agg(x::text, ',' ORDER BY x.profile_id)) FROM p_backward_read.customer_360 x").fetch_one(&slice.db.pool).await?;
    assert_eq!(a, b);
    slice.db.drop_db().await
}

fn merge_event(winner: uuid::Uuid, loser: uuid::Uuid) -> anyhow::Result<Vec<u8>> {
    use cdp_schemas::model::identity::*;
    let mut e = cdp_schemas::fixtures::identity_events().remove(1);
    e.envelope.event_id = uuid::Uuid::now_v7();
    e.envelope.partition_key = winner.to_string();
    e.payload = cdp_schemas::IdentityPayload::ProfilesMerged(ProfilesMerged {
        winner_profile_id: winner,
        loser_profile_id: loser,
        link_id: uuid::Uuid::from_u128(7),
        cause_event_id: uuid::Uuid::from_u128(8),
    });
    Ok(cdp_schemas::encode(&e)?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_merge_repoints_rows_and_applying_it_twice_changes_nothing() -> anyhow::Result<()> {
    let slice = Slice::create().await?;
    slice
        .produce(&slice.prepare(0..1_000, 49).await?, |_| None)
        .await?;
    let config = slice.config("merge");
    let (stop, task) = spawn(config.clone());
    slice.caught_up(&config, Duration::from_secs(120)).await?;
    let (winner, loser) = (
        slice.profile_of_user("user-1").await?,
        slice.profile_of_user("user-2").await?,
    );
    let count = |p: uuid::Uuid| {
        let pool = slice.db.pool.clone();
        async move {
            let (n,): (i64,) = sqlx::query_as(
                "SELECT count(*) FROM p_merge_read.interactions WHERE profile_id = $1",
            )
            .bind(p)
            .fetch_one(&pool)
            .await?;
            anyhow::Ok(n)
        }
    };
    let (w0, l0) = (count(winner).await?, count(loser).await?);
    assert!(w0 > 0 && l0 > 0);
    let identity = slice.topic(Topic::Identity);
    let record = merge_event(winner, loser)?;
    let send = || async {
        slice
            .producer
            .send(cdp_runtime::kafka::producer::OutgoingRecord {
                topic: &identity,
                key: Some(winner.to_string().as_bytes()),
                value: Some(&record),
                ..Default::default()
            })
            .await
    };
    send().await?;
    slice.caught_up(&config, Duration::from_secs(60)).await?;
    assert_eq!(
        (count(winner).await?, count(loser).await?),
        (w0 + l0, 0),
        "the loser's rows belong to the winner"
    );
    let (gone,): (i64,) =
        sqlx::query_as("SELECT count(*) FROM p_merge_read.customers WHERE profile_id = $1")
            .bind(loser)
            .fetch_one(&slice.db.pool)
            .await?;
    assert_eq!(gone, 0);
    let after = slice.digest(&config).await?;
    send().await?;
    slice.caught_up(&config, Duration::from_secs(60)).await?;
    assert_eq!(
        slice.digest(&config).await?,
        after,
        "the same merge again changes nothing"
    );
    // Later events of the merged-away subject land on the winner.
    slice
        .produce(&slice.prepare(1_000..1_050, 49).await?, |_| None)
        .await?;
    slice.caught_up(&config, Duration::from_secs(60)).await?;
    assert_eq!(count(loser).await?, 0);

    // Subscribers: a snapshot for the winner, a tombstone for the loser, on the profiles topic.
    let profiles = slice.topic(Topic::Profiles);
    tombstone_published(&profiles, loser).await?;
    // The winner's last snapshot is the read model's: its counts, and its identifiers in
    // byte order of (kind, namespace, hash).
    let interactions = count(winner).await?;
    let (transactions,): (i64,) =
        sqlx::query_as("SELECT count(*) FROM p_merge_read.transactions WHERE profile_id = $1")
            .bind(winner)
            .fetch_one(&slice.db.pool)
            .await?;
    let identifiers: Vec<(String, String, String)> = sqlx::query_as(
        "SELECT kind, namespace, token FROM p_merge_read.customer_identities WHERE profile_id = $1
          ORDER BY kind COLLATE \"C\", namespace COLLATE \"C\", token COLLATE \"C\"",
    )
    .bind(winner)
    .fetch_all(&slice.db.pool)
    .await?;
    assert!(identifiers.len() > 1 && transactions > 0);
    let snapshot_of = |r: &cdp_integration_tests::Consumed| {
        let value = r.value.as_deref()?;
        let cdp_schemas::ProfilePayload::Snapshot(s) =
            cdp_schemas::decode::<cdp_schemas::ProfileEvent>(value)
                .ok()?
                .payload;
        (s.profile_id == winner).then_some(s)
    };
    let current = |s: &cdp_schemas::model::profile::ProfileSnapshot| {
        let ids: Vec<(String, String, String)> = s
            .identifiers
            .iter()
            .map(|i| {
                let ns = i.namespace.clone().unwrap_or_default();
                (i.kind.as_str().to_owned(), ns, i.token.clone())
            })
            .collect();
        s.interactions == interactions && s.transactions == transactions && ids == identifiers
    };
    published(
        &profiles,
        "the winner's snapshot of the final read model",
        |r| snapshot_of(r).is_some_and(|s| current(&s)),
    )
    .await?;
    let n = topic_len(&profiles).await? as usize;
    let recs = consume(&profiles, n, Duration::from_secs(30)).await?;
    let s = recs
        .iter()
        .rev()
        .find_map(snapshot_of)
        .ok_or_else(|| anyhow::anyhow!("no snapshot of the winner"))?;
    assert!(
        current(&s),
        "the latest snapshot is of the final read model"
    );
    let names: Vec<&str> = s.traits.iter().map(|t| t.name.as_str()).collect();
    let mut sorted = names.clone();
    sorted.sort_unstable();
    assert_eq!(names, sorted, "traits in name order");
    let email = s
        .traits
        .iter()
        .find(|t| t.name == "email")
        .ok_or_else(|| anyhow::anyhow!("no email trait"))?;
    assert!(email.value.is_none(), "PII travels sealed only");
    let sealed = email
        .sealed
        .clone()
        .ok_or_else(|| anyhow::anyhow!("unsealed"))?;
    let version = cdp_keystore::crypto::sealed_version(&sealed)?;
    let key = slice
        .keys
        .key(&email.subject_id, version)
        .await?
        .ok_or_else(|| anyhow::anyhow!("no key"))?;
    let plain = String::from_utf8(key.open(
        &cdp_keystore::crypto::field_aad(&email.subject_id, "email"),
        &sealed,
    )?)?;
    assert!(plain.ends_with("@example.org"));
    stop.trigger();
    task.await??;
    slice.db.drop_db().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_erased_subjects_events_write_no_pii_on_replay() -> anyhow::Result<()> {
    let slice = Slice::create().await?;
    slice
        .produce(&slice.prepare(0..1_000, 49).await?, |_| None)
        .await?;
    let config = slice.config("erase");
    let (stop, task) = spawn(config.clone());
    slice.caught_up(&config, Duration::from_secs(120)).await?;
    stop.trigger();
    task.await??;
    let subject = slice
        .token(cdp_schemas::IdentifierKind::UserId, "user-3")
        .await?;
    let profile = cdp_schemas::profile_id_of(&subject);
    let mut conn = slice.db.pool.acquire().await?;
    assert!(cdp_keystore::KeyStore::destroy(&mut conn, &[subject]).await? >= 1);
    drop(conn);
    let rebuilt = cdp_projector::rebuild(
        config.clone(),
        cdp_projector::ReplayFrom::Earliest,
        cdp_runtime::Shutdown::new(),
    )
    .await?;
    assert_eq!(rebuilt.generation, 2);
    let traits: Vec<(String, Option<String>)> = sqlx::query_as("SELECT trait, value FROM p_erase_read.customer_traits WHERE profile_id = $1 ORDER BY trait")
        .bind(profile)
        .fetch_all(&slice.db.pool)
        .await?;
    assert_eq!(
        traits.iter().map(|(t, _)| t.as_str()).collect::<Vec<_>>(),
        vec!["country"],
        "only non-PII traits remain"
    );
    let (props,): (i64,) = sqlx::query_as("SELECT count(*) FROM p_erase_read.interactions WHERE profile_id = $1 AND properties IS NOT NULL")
        .bind(profile)
        .fetch_one(&slice.db.pool)
        .await?;
    assert_eq!(props, 0, "sealed properties are dropped");
    let (facts,): (i64,) =
        sqlx::query_as("SELECT count(*) FROM p_erase_read.transactions WHERE profile_id = $1")
            .bind(profile)
            .fetch_one(&slice.db.pool)
            .await?;
    assert!(facts > 0, "non-personal facts stay");
    let (others,): (i64,) =
        sqlx::query_as("SELECT count(*) FROM p_erase_read.customer_360 WHERE email IS NOT NULL")
            .fetch_one(&slice.db.pool)
            .await?;
    assert_eq!(others, 48, "every other subject keeps its PII");
    slice.db.drop_db().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_profile_api_looks_up_pages_caches_audits_and_refuses_strangers() -> anyhow::Result<()>
{
    let slice = Slice::create().await?;
    slice
        .produce(&slice.prepare(0..2_000, 49).await?, |_| None)
        .await?;
    let config = slice.config("api");
    // Identity decides which identifiers belong to which profile (emails, anonymous ids).
    let identity = cdp_integration_tests::identity::identity_for(
        &slice.kafka,
        &slice.db,
        &slice.key_args,
        "id_api",
    );
    let (stop_identity, identity_task) = cdp_integration_tests::identity::spawn(identity.clone());
    let (stop, task) = spawn(config.clone());
    slice
        .caught_up_with_identity(&identity, &config, Duration::from_secs(120))
        .await?;
    stop_identity.trigger();
    identity_task.await??;
    let shutdown = cdp_runtime::Shutdown::new();
    let api_args = cdp_projector::ApiArgs {
        api_addr: "127.0.0.1:0".parse()?,
        api_tokens: vec![
            "analyst:read:s3cret".into(),
            "collector:ingest:other".into(),
        ],
    };
    let (addr, serve) = cdp_projector::bind_api(
        &slice.db.args(),
        &slice.key_args,
        "p_api",
        &api_args,
        shutdown.clone(),
    )
    .await?;
    let server = tokio::spawn(serve);
    let base = format!("http://{addr}");
    let client = reqwest::Client::new();
    let get = |path: String, token: Option<&'static str>| {
        let mut req = client.get(format!("{base}{path}"));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        req.send()
    };
    let user7 = slice.profile_of_user("user-7").await?;

    // Lookup by each identifier (values normalized like at ingest).
    for q in [
        "user_id=user-7",
        "email=%20User-7-1%40Example.ORG%20",
        "anonymous_id=anon-7",
    ] {
        let resp = get(format!("/v1/profiles?{q}"), Some("s3cret")).await?;
        assert_eq!(resp.status().as_u16(), 200, "{q}");
        let body: serde_json::Value = resp.json().await?;
        assert_eq!(body["profile_id"], user7.to_string(), "{q}");
    }
    let user5 = slice.profile_of_user("user-5").await?;
    let resp = get(
        "/v1/profiles?phone=%2B44%2020%207123%200005".into(),
        Some("s3cret"),
    )
    .await?;
    assert_eq!(resp.status().as_u16(), 200);
    assert_eq!(
        resp.json::<serde_json::Value>().await?["profile_id"],
        user5.to_string()
    );

    // The 360: traits opened, identities hashed, consents, totals, capsules.
    let resp = get(format!("/v1/profiles/{user7}"), Some("s3cret")).await?;
    assert_eq!(resp.status().as_u16(), 200);
    let etag = resp
        .headers()
        .get("etag")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .unwrap_or_default();
    let body: serde_json::Value = resp.json().await?;
    assert!(body["traits"]["email"]
        .as_str()
        .is_some_and(|e| e.starts_with("user-7-")));
    // Identities are shown as the vault's tokens: the user id's is the subject's.
    let user7_token = slice
        .token(cdp_schemas::IdentifierKind::UserId, "user-7")
        .await?;
    let identities = body["identities"].as_array().cloned().unwrap_or_default();
    assert!(identities.iter().all(|i| i["token"]
        .as_str()
        .is_some_and(|t| t.len() == 32 && t.bytes().all(|c| c.is_ascii_hexdigit()))));
    assert!(identities
        .iter()
        .any(|i| i["kind"] == "USER_ID" && i["token"] == user7_token.as_str()));
    assert!(!body["consents"]
        .as_array()
        .map(Vec::is_empty)
        .unwrap_or(true));
    assert_eq!(body["transaction_totals"][0]["currency"], "EUR");
    assert!(body["last_interactions"]
        .as_array()
        .is_some_and(|a| a.len() == 10));
    let cached = client
        .get(format!("{base}/v1/profiles/{user7}"))
        .bearer_auth("s3cret")
        .header("If-None-Match", &etag)
        .send()
        .await?;
    assert_eq!(cached.status().as_u16(), 304, "ETag revalidation");

    // Pagination with cursors walks every interaction once, newest first.
    let (total,): (i64,) =
        sqlx::query_as("SELECT count(*) FROM p_api_read.interactions WHERE profile_id = $1")
            .bind(user7)
            .fetch_one(&slice.db.pool)
            .await?;
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(c) => format!("/v1/profiles/{user7}/interactions?limit=7&cursor={c}"),
            None => format!("/v1/profiles/{user7}/interactions?limit=7"),
        };
        let page: serde_json::Value = get(path, Some("s3cret")).await?.json().await?;
        for i in page["items"].as_array().cloned().unwrap_or_default() {
            seen.push((
                i["occurred_at"].as_str().unwrap_or("").to_owned(),
                i["event_id"].as_str().unwrap_or("").to_owned(),
            ));
        }
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    assert_eq!(seen.len() as i64, total);
    let mut sorted = seen.clone();
    sorted.sort();
    sorted.reverse();
    sorted.dedup();
    assert_eq!(sorted, seen, "newest first, no repeats");
    let tx: serde_json::Value = get(
        format!("/v1/profiles/{user7}/transactions?limit=2"),
        Some("s3cret"),
    )
    .await?
    .json()
    .await?;
    assert_eq!(tx["items"].as_array().map(Vec::len), Some(2));

    // Unknown profiles, strangers, the wrong role.
    let unknown = uuid::Uuid::new_v4();
    assert_eq!(
        get(format!("/v1/profiles/{unknown}"), Some("s3cret"))
            .await?
            .status()
            .as_u16(),
        404
    );
    assert_eq!(
        get(
            "/v1/profiles?email=nobody%40example.org".into(),
            Some("s3cret")
        )
        .await?
        .status()
        .as_u16(),
        404
    );
    assert_eq!(
        get(format!("/v1/profiles/{user7}"), None)
            .await?
            .status()
            .as_u16(),
        401
    );
    assert_eq!(
        get(format!("/v1/profiles/{user7}"), Some("wrong"))
            .await?
            .status()
            .as_u16(),
        401
    );
    assert_eq!(
        get(format!("/v1/profiles/{user7}"), Some("other"))
            .await?
            .status()
            .as_u16(),
        403
    );

    // Every access is audited, without the looked-up values.
    let (audited,): (i64,) = sqlx::query_as(
        "SELECT count(*) FROM profile_access_audit WHERE principal = 'analyst' AND profile_id = $1",
    )
    .bind(user7)
    .fetch_one(&slice.db.pool)
    .await?;
    assert!(audited >= 5, "{audited}");
    // Reads that found nothing are audited too: the id asked for, or no profile for an
    // identifier that matched none.
    let (misses,): (i64,) = sqlx::query_as(
        "SELECT count(*) FROM profile_access_audit
          WHERE principal = 'analyst' AND (profile_id = $1 OR (profile_id IS NULL AND lookup = 'email'))",
    )
    .bind(unknown)
    .fetch_one(&slice.db.pool)
    .await?;
    assert_eq!(misses, 2);
    let (leaks,): (i64,) =
        sqlx::query_as("SELECT count(*) FROM profile_access_audit WHERE lookup LIKE '%@%'")
            .fetch_one(&slice.db.pool)
            .await?;
    assert_eq!(leaks, 0);
    shutdown.trigger();
    server.await??;
    stop.trigger();
    task.await??;
    slice.db.drop_db().await
}

/// A live generation created by the previous release (keyed outbox, one profile waiting in
/// it) gets the newer read-model migrations when the projector starts, and what its outbox
/// held is still published.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_generation_from_an_older_release_is_migrated_and_its_outbox_published(
) -> anyhow::Result<()> {
    let slice = Slice::create().await?;
    let config = slice.config("upgrade");
    let g = cdp_projector::generation::ensure_live(
        &slice.db.pool,
        &config.pg,
        &config.projector.schema_prefix,
    )
    .await?;
    let schema = g.schema();
    let waiting = uuid::Uuid::new_v4();
    for sql in [
        format!(r#"DELETE FROM "{schema}"._sqlx_migrations WHERE version = 20261122000402"#),
        format!(r#"DROP TABLE "{schema}".profile_outbox"#),
        format!(
            r#"CREATE TABLE "{schema}".profile_outbox (profile_id UUID PRIMARY KEY, deleted BOOLEAN NOT NULL)"#
        ),
    ] {
        sqlx::query(&sql).execute(&slice.db.pool).await?;
    }
    sqlx::query(&format!(
        r#"INSERT INTO "{schema}".profile_outbox (profile_id, deleted) VALUES ($1, true)"#
    ))
    .bind(waiting)
    .execute(&slice.db.pool)
    .await?;

    let events = slice.prepare(0..300, 30).await?;
    slice.produce(&events, |_| None).await?;
    let (stop, task) = spawn(config.clone());
    slice.caught_up(&config, Duration::from_secs(60)).await?;

    let (migrated,): (bool,) = sqlx::query_as(
        "SELECT EXISTS (SELECT 1 FROM information_schema.columns
                         WHERE table_schema = $1 AND table_name = 'profile_outbox' AND column_name = 'seq')",
    )
    .bind(&schema)
    .fetch_one(&slice.db.pool)
    .await?;
    assert!(migrated, "the live generation's outbox was not migrated");
    let profiles = slice.topic(Topic::Profiles);
    tombstone_published(&profiles, waiting).await?;
    // The batches projected after the upgrade are published too (maybe by a later pass).
    published(&profiles, "a snapshot published after the upgrade", |r| {
        r.value.is_some()
    })
    .await?;
    stop.trigger();
    task.await??;
    Ok(())
}

/// A live generation made by an older release (identifiers with `last_seen`, read views over
/// that column) is brought onto the current migrations when the projector starts: the column
/// goes, and the read views are re-created over the table as it now is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_live_generation_is_migrated_and_its_read_views_recreated() -> anyhow::Result<()> {
    let db = TestDb::create().await?;
    let prefix = "p_upgrade";
    let g = cdp_projector::generation::create(&db.pool, &db.args(), prefix).await?;
    let s = g.schema();
    // What the release before 20261123000404 left behind.
    sqlx::query(&format!(
        "ALTER TABLE \"{s}\".customer_identities ADD COLUMN last_seen TIMESTAMPTZ"
    ))
    .execute(&db.pool)
    .await?;
    sqlx::query(&format!(
        "DELETE FROM \"{s}\"._sqlx_migrations WHERE version = 20261123000404"
    ))
    .execute(&db.pool)
    .await?;
    cdp_projector::generation::swap(&db.pool, &g).await?;
    let gen_pool = g.pool(&db.args()).await?;
    let columns = |schema: String| {
        let pool = db.pool.clone();
        async move {
            let (c,): (Vec<String>,) = sqlx::query_as(
                "SELECT coalesce(array_agg(column_name::text ORDER BY ordinal_position), '{}')
                   FROM information_schema.columns WHERE table_schema = $1 AND table_name = 'customer_identities'",
            )
            .bind(schema)
            .fetch_one(&pool)
            .await?;
            anyhow::Ok(c)
        }
    };
    assert!(columns(format!("{prefix}_read"))
        .await?
        .contains(&"last_seen".to_owned()));

    cdp_projector::generation::upgrade(&db.pool, &gen_pool, &g).await?;
    let table = columns(s.clone()).await?;
    let view = columns(format!("{prefix}_read")).await?;
    assert!(!table.contains(&"last_seen".to_owned()), "{table:?}");
    assert_eq!(
        view, table,
        "the read view lists the table's columns as they now are"
    );
    // Upgrading again changes nothing.
    cdp_projector::generation::upgrade(&db.pool, &gen_pool, &g).await?;
    assert_eq!(columns(format!("{prefix}_read")).await?, table);
    gen_pool.close().await;
    db.drop_db().await
}

/// The merge lock: batches share it, a batch applying merges or splits holds it alone, so no
/// merge commits between another batch resolving its profiles and committing its rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn merges_wait_for_batches_in_flight_and_batches_for_merges() -> anyhow::Result<()> {
    use cdp_projector::store::hold_merges;
    let db = TestDb::create().await?;
    // Requests for the merge lock this database's sessions are waiting on (not granted).
    let waiting = || async {
        let (n,): (i64,) = sqlx::query_as(
            "SELECT count(*) FROM pg_locks
              WHERE locktype = 'advisory' AND NOT granted
                AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
        )
        .fetch_one(&db.pool)
        .await?;
        Ok::<_, anyhow::Error>(n)
    };
    // Asks for the lock on a new transaction in a task; returns once Postgres shows the
    // request queued (not granted).
    let queue = async |exclusive: bool, what: &str| {
        let mut tx = db.pool.begin().await?;
        let task = tokio::spawn(async move {
            hold_merges(&mut tx, exclusive).await?;
            Ok::<_, sqlx::Error>(tx)
        });
        wait_until(what, Duration::from_secs(10), || async {
            Ok(waiting().await? == 1)
        })
        .await?;
        Ok::<_, anyhow::Error>(task)
    };
    let (mut a, mut b) = (db.pool.begin().await?, db.pool.begin().await?);
    hold_merges(&mut a, false).await?;
    // Another batch shares the lock.
    tokio::time::timeout(Duration::from_secs(10), hold_merges(&mut b, false))
        .await
        .map_err(|_| anyhow::anyhow!("two batches must not wait for each other"))??;
    // A merge waits for both batches to commit.
    let merging = queue(true, "the merge to queue for the lock").await?;
    assert!(
        !merging.is_finished(),
        "a merge waits for batches in flight"
    );
    // Postgres hands a released lock on while the releasing commit runs: once it returned,
    // the merge holds the lock if it could.
    a.commit().await?;
    assert_eq!(
        waiting().await?,
        1,
        "a merge waits for every batch in flight"
    );
    assert!(
        !merging.is_finished(),
        "a merge waits for every batch in flight"
    );
    b.commit().await?;
    let merge = tokio::time::timeout(Duration::from_secs(10), merging).await???;
    // While the merge is open, a new batch waits for it.
    let batch = queue(false, "the batch to queue for the lock").await?;
    assert!(!batch.is_finished(), "a batch waits for a merge in flight");
    merge.commit().await?;
    let c = tokio::time::timeout(Duration::from_secs(10), batch).await???;
    c.commit().await?;
    db.drop_db().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_settled_in_an_earlier_batch_still_gives_way_to_an_earlier_one_arriving_later(
) -> anyhow::Result<()> {
    use cdp_integration_tests::identity::origin;
    use cdp_schemas::IdentifierKind;
    use chrono::{DateTime, Utc};

    let slice = Slice::create().await?;
    let config = slice.config("claims");
    let (stop, task) = spawn(config.clone());
    let id = |kind, v: &'static str| {
        let slice = &slice;
        async move {
            anyhow::Ok(cdp_schemas::Identifier {
                kind,
                namespace: None,
                token: slice.token(kind, v).await?,
            })
        }
    };
    let shared = id(IdentifierKind::Email, "shared@example.org").await?;
    let at = |secs: i64| origin() + chrono::Duration::seconds(secs);
    let claim = || async {
        let row: (uuid::Uuid, DateTime<Utc>) = sqlx::query_as(
            "SELECT profile_id, first_seen FROM p_claims_read.customer_identities WHERE kind = 'EMAIL'",
        )
        .fetch_one(&slice.db.pool)
        .await?;
        anyhow::Ok(row)
    };
    // One batch at a time: identity links a user's id with the shared email at a time (as
    // it would when several profiles claim one email over time, re-deriving on late events).
    let link = |u: &'static str, secs: i64| {
        let (slice, config, shared) = (&slice, &config, shared.clone());
        async move {
            let from = id(IdentifierKind::UserId, u).await?;
            let profile = cdp_schemas::profile_id_of(&from.token);
            slice.publish_link(profile, from, shared, at(secs)).await?;
            slice.caught_up(config, Duration::from_secs(60)).await
        }
    };
    let (a, b, c) = (
        slice.profile_of_user("user-a").await?,
        slice.profile_of_user("user-b").await?,
        slice.profile_of_user("user-c").await?,
    );

    link("user-a", 100).await?;
    assert_eq!(claim().await?, (a, at(100)));
    // Later than the claim this projector already saw: it stays A's.
    link("user-b", 200).await?;
    assert_eq!(
        claim().await?,
        (a, at(100)),
        "a later claim changes nothing"
    );
    // Earlier, arriving later: it wins.
    link("user-c", 50).await?;
    assert_eq!(
        claim().await?,
        (c, at(50)),
        "an earlier claim wins whenever it arrives"
    );
    // The same time as the claim: the lower profile id wins, so it must reach Postgres.
    link("user-b", 50).await?;
    assert_eq!(
        claim().await?,
        (b.min(c), at(50)),
        "a tie goes to the lower profile id"
    );

    stop.trigger();
    task.await??;
    slice.db.drop_db().await
}

/// Values Postgres refuses (a NUL character in text or a `\u0000` escape in jsonb), produced
/// straight to Kafka past ingest's check: the projector and identity dead-letter exactly the
/// records carrying them, with the SQLSTATE as the reason, and project everything else; neither
/// service stops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_value_postgres_refuses_is_dead_lettered_and_the_pipeline_moves_on() -> anyhow::Result<()>
{
    use cdp_ingest::publisher::{envelope, plain, Draft};
    use cdp_integration_tests::identity::{identity_for, origin};
    use cdp_keystore::RawIdentifier;
    use cdp_runtime::dlq::headers;
    use cdp_schemas::model::capsule::CapsuleCreated;
    use cdp_schemas::model::customer::{Identify, Track};
    use cdp_schemas::{
        CapsuleEvent, CapsulePayload, CustomerEvent, CustomerPayload, IdentifierKind,
    };
    use uuid::Uuid;

    let slice = Slice::create().await?;
    let at = |n: u128| origin() + chrono::Duration::seconds(n as i64);
    let user = |n: u128| {
        vec![RawIdentifier::new(
            IdentifierKind::UserId,
            format!("nul-{n}"),
        )]
    };
    let customer = |n: u128, payload, identifiers| Draft {
        event: CustomerEvent {
            envelope: envelope(Uuid::from_u128(0x0a11_0000 + n), at(n), at(n), "test"),
            payload,
        },
        identifiers,
        references: Vec::new(),
    };
    let good = |n: u128| {
        customer(
            n,
            CustomerPayload::Track(cdp_integration_tests::product_view(n as u64)),
            user(n),
        )
    };
    let track = |name: &str, properties: &str| {
        CustomerPayload::Track(Track {
            interaction_type: name.to_owned(),
            channel: None,
            touchpoint: None,
            duration_ms: None,
            outcome: None,
            properties: plain(properties),
        })
    };
    // Each refused value, each followed by a good event of another subject.
    let mut customers = vec![
        customer(1, track("Sign\u{0}up", "{}"), user(1)),
        customer(
            3,
            CustomerPayload::Identify(Identify {
                email: plain("ada\u{0}@example.org"),
                ..Identify::default()
            }),
            user(3),
        ),
        customer(
            5,
            CustomerPayload::Identify(Identify {
                country: Some("G\u{0}B".to_owned()),
                ..Identify::default()
            }),
            user(5),
        ),
        customer(7, track("Clicked", r#"{"plan": "a\u0000b"}"#), user(7)),
        customer(9, track("Clicked", "not json \u{0}"), user(9)),
        // Only identity stores an external id's namespace.
        customer(
            11,
            track("Clicked", "{}"),
            vec![
                RawIdentifier::new(IdentifierKind::UserId, "nul-11"),
                RawIdentifier {
                    kind: IdentifierKind::ExternalId,
                    namespace: Some("crm\u{0}x".to_owned()),
                    value: "c-11".to_owned(),
                },
            ],
        ),
    ];
    customers.extend([2, 4, 6, 8, 10, 12].map(good));
    let capsule = |n: u128, title: &str| Draft {
        event: CapsuleEvent {
            envelope: envelope(Uuid::from_u128(0x0a11_0000 + n), at(n), at(n), "test"),
            payload: CapsulePayload::Created(CapsuleCreated {
                capsule_id: Uuid::from_u128(0xca95 + n),
                owner_subject_id: String::new(),
                title: plain(title),
                content_type: "text/plain".to_owned(),
                storage_path: None,
                settings_json: None,
            }),
        },
        references: Vec::new(),
        identifiers: user(n),
    };
    let mut prepared = slice.publisher.prepare(customers).await?;
    prepared.extend(
        slice
            .publisher
            .prepare(vec![capsule(13, "T\u{0}"), capsule(14, "Fine")])
            .await?,
    );
    slice.produce(&prepared, |_| Some(0)).await?;

    let pc = slice.config("nul");
    let ic = identity_for(&slice.kafka, &slice.db, &slice.key_args, "id_nul");
    let (stop_p, task_p) = spawn(pc.clone());
    let (stop_i, task_i) = cdp_integration_tests::identity::spawn(ic.clone());
    slice
        .caught_up_with_identity(&ic, &pc, Duration::from_secs(120))
        .await?;
    assert!(
        !task_p.is_finished() && !task_i.is_finished(),
        "both services are still running"
    );

    // Every good event is projected (and the bad ones' other records did not get in).
    let (interactions,): (i64,) = sqlx::query_as("SELECT count(*) FROM p_nul_read.interactions")
        .fetch_one(&slice.db.pool)
        .await?;
    assert_eq!(
        interactions, 7,
        "the six good tracks and the external-id one"
    );
    let (capsules,): (Vec<String>,) =
        sqlx::query_as("SELECT array_agg(title) FROM p_nul_read.capsules")
            .fetch_one(&slice.db.pool)
            .await?;
    assert_eq!(capsules, ["Fine"]);

    // Dead letters: six from the projector, one from identity.
    let dead = consume(&slice.topic(Topic::DeadLetter), 7, Duration::from_secs(60)).await?;
    assert_eq!(
        topic_len(&slice.topic(Topic::DeadLetter)).await?,
        7,
        "one dead letter per refused record and consumer, no more"
    );
    let mut letters = std::collections::BTreeSet::new();
    for d in &dead {
        assert_eq!(
            d.headers.get(headers::KIND).map(String::as_str),
            Some("refused_by_database"),
            "{:?}",
            d.headers
        );
        let reason = d.headers.get(headers::REASON).cloned().unwrap_or_default();
        assert!(
            reason.contains("SQLSTATE 22021") || reason.contains("SQLSTATE 22P05"),
            "{reason}"
        );
        let header = |h: &str| d.headers.get(h).cloned().unwrap_or_default();
        letters.insert((
            header(headers::GROUP) == ic.identity.group,
            header(headers::TOPIC),
            header(headers::OFFSET).parse::<i64>().unwrap_or(-1),
        ));
    }
    // Customer events went in order onto partition 0: the refused ones at offsets 0 to 5.
    let (customer_topic, capsule_topic) = (
        slice.topic(Topic::CustomerEvents),
        slice.topic(Topic::CapsuleEvents),
    );
    let mut want: std::collections::BTreeSet<(bool, String, i64)> =
        (0..5).map(|o| (false, customer_topic.clone(), o)).collect();
    want.insert((false, capsule_topic, 0));
    want.insert((true, customer_topic, 5));
    assert_eq!(
        letters, want,
        "the projector dead-lettered its five customer records and the capsule, identity the namespace"
    );
    stop_p.trigger();
    stop_i.trigger();
    task_p.await??;
    task_i.await??;
    slice.db.drop_db().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuild_from_a_time_equals_one_from_scratch_when_live_is_behind_and_under_load(
) -> anyhow::Result<()> {
    let slice = Slice::create().await?;
    let config = slice.config("fromtime");
    // The live generation applies a first part and stops: it stands behind the log.
    slice
        .produce(&slice.prepare(0..1_000, 99).await?, |_| None)
        .await?;
    let (stop, task) = spawn(config.clone());
    slice.caught_up(&config, Duration::from_secs(120)).await?;
    stop.trigger();
    task.await??;
    slice
        .produce(&slice.prepare(1_000..2_000, 99).await?, |_| None)
        .await?;
    // Every record so far was acknowledged before `t`: a start at `t` is past the live
    // generation's position, and the records in between must not be skipped.
    let t = chrono::Utc::now() + chrono::Duration::milliseconds(1);
    tokio::time::sleep(Duration::from_millis(5)).await;
    slice
        .produce(&slice.prepare(2_000..2_300, 99).await?, |_| None)
        .await?;
    let rebuild = |from| cdp_projector::rebuild(config.clone(), from, cdp_runtime::Shutdown::new());
    let from_time = rebuild(cdp_projector::ReplayFrom::Time(t)).await?;
    let scratch = rebuild(cdp_projector::ReplayFrom::Earliest).await?;
    assert_eq!(
        from_time.digest, scratch.digest,
        "a rebuild from a time after the live position equals one from scratch"
    );

    // Under load: the live projector writes while a rebuild copies its tables.
    let (stop, task) = spawn(config.clone());
    slice
        .produce(&slice.prepare(2_300..3_300, 99).await?, |_| None)
        .await?;
    let t = chrono::Utc::now();
    let events = slice.prepare(3_300..6_300, 99).await?;
    let load = async {
        for chunk in events.chunks(100) {
            slice.produce(chunk, |_| None).await?;
        }
        anyhow::Ok(())
    };
    let (under_load, load) = tokio::join!(rebuild(cdp_projector::ReplayFrom::Time(t)), load);
    let under_load = under_load?;
    load?;
    slice.caught_up(&config, Duration::from_secs(120)).await?;
    let live = slice.digest(&config).await?;
    stop.trigger();
    task.await??;
    let scratch = rebuild(cdp_projector::ReplayFrom::Earliest).await?;
    assert_eq!(
        live, scratch.digest,
        "generation {} (rebuilt from a time under load, then live) equals one from scratch",
        under_load.generation
    );
    slice.db.drop_db().await
}
