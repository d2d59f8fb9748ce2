//! Identity resolution against the real broker and Postgres: dedup and the resolved stream,
//! the rules' refusals, the mega-merge and its split, kill -9, two instances, the API.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use cdp_identity::SplitTarget;
use cdp_integration_tests::identity::{identity_for, spawn, workload, IdSlice, Spec};
use cdp_integration_tests::{brokers, consume, topic_len, wait_until};
use cdp_runtime::topics::Topic;
use cdp_schemas::{CustomerEvent, IdentifierKind, IdentityEvent, IdentityPayload};
use uuid::Uuid;

use IdentifierKind::{AnonymousId as Anon, DeviceId as Device, Email, UserId as User};

const WAIT: Duration = Duration::from_secs(180);

/// Every record of the resolved stream: (event id, key, profile header).
async fn resolved(slice: &IdSlice) -> anyhow::Result<Vec<(Uuid, String, String)>> {
    let topic = slice.topic(Topic::ResolvedEvents);
    let n = topic_len(&topic).await? as usize;
    let recs = consume(&topic, n, Duration::from_secs(60)).await?;
    recs.into_iter()
        .map(|r| {
            let e: CustomerEvent = cdp_schemas::decode(r.value.as_deref().unwrap_or_default())?;
            Ok((
                e.envelope.event_id,
                String::from_utf8_lossy(r.key.as_deref().unwrap_or_default()).into_owned(),
                r.headers.get("cdp-profile-id").cloned().unwrap_or_default(),
            ))
        })
        .collect()
}

async fn identity_events(slice: &IdSlice) -> anyhow::Result<Vec<IdentityEvent>> {
    let topic = slice.topic(Topic::Identity);
    let n = topic_len(&topic).await? as usize;
    let recs = consume(&topic, n, Duration::from_secs(60)).await?;
    recs.into_iter()
        .filter_map(|r| r.value)
        .map(|v| Ok(cdp_schemas::decode(&v)?))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicates_have_no_second_effect_and_the_resolved_stream_has_each_event_once(
) -> anyhow::Result<()> {
    let slice = IdSlice::create(None).await?;
    let specs: Vec<Spec> = (0..300u128)
        .map(|i| {
            let anon = format!("a{}", i % 50);
            let email = format!("p{}@example.org", i % 50);
            if i % 7 == 0 {
                Spec::new(i, i as i64, &[(Anon, &anon), (Email, &email)])
            } else {
                Spec::new(i, i as i64, &[(Anon, &anon)])
            }
        })
        .collect();
    // Every event twice: the second copies on other partitions, after the first.
    slice.produce(&specs, |i| Some((i % 3) as i32)).await?;
    slice.produce(&specs, |i| Some(3 + (i % 3) as i32)).await?;
    let config = slice.config("dedup", IdSlice::default_rules());
    let (stop, task) = spawn(config.clone());
    slice.caught_up(&config, WAIT).await?;
    // A third delivery after a restart: still no effect.
    stop.trigger();
    task.await??;
    let pool = slice.pool(&config).await?;
    let before = cdp_identity::store::digest(&pool).await?;
    slice.produce(&specs[..100], |_| Some(0)).await?;
    let (stop, task) = spawn(config.clone());
    slice.caught_up(&config, WAIT).await?;
    stop.trigger();
    task.await??;
    assert_eq!(
        cdp_identity::store::digest(&pool).await?,
        before,
        "redelivery changes nothing"
    );
    let (observed,): (i64,) = sqlx::query_as("SELECT count(*) FROM identity_observations")
        .fetch_one(&pool)
        .await?;
    assert_eq!(observed, 300);

    let out = resolved(&slice).await?;
    assert_eq!(out.len(), 300, "each event once in the resolved stream");
    let ids: BTreeSet<Uuid> = out.iter().map(|r| r.0).collect();
    assert_eq!(ids, specs.iter().map(|s| s.event_id).collect());
    for (_, key, header) in &out {
        assert_eq!(key, header, "keyed by the profile it is stamped with");
        assert!(Uuid::parse_str(header).is_ok());
    }
    // Anonymous ids sharing nothing stay apart; an email links only its own anonymous id.
    let p = slice
        .profiles(
            &pool,
            &[(Anon, "a0"), (Email, "p0@example.org"), (Anon, "a1")],
        )
        .await?;
    assert_eq!(p[0], p[1]);
    assert_ne!(p[0], p[2]);
    pool.close().await;
    slice.db.drop_db().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_rule_refuses_a_link_and_records_why() -> anyhow::Result<()> {
    let slice = IdSlice::create(None).await?;
    let mut rules = IdSlice::default_rules();
    rules.limits = vec!["email=2".to_owned()];
    rules.ttl = vec!["device_id=1h".to_owned()];
    let specs = vec![
        // unique: two user ids never share a profile.
        Spec::new(1, 0, &[(User, "u1"), (Email, "shared@example.org")]),
        Spec::new(2, 10, &[(User, "u2"), (Email, "shared@example.org")]),
        // limit: a third email for u3.
        Spec::new(3, 20, &[(User, "u3"), (Email, "a@example.org")]),
        Spec::new(4, 30, &[(User, "u3"), (Email, "b@example.org")]),
        Spec::new(5, 40, &[(User, "u3"), (Email, "c@example.org")]),
        // blocked: the default list has test@example.com.
        Spec::new(6, 50, &[(Anon, "x1"), (Email, "TEST@example.com")]),
        // ttl: the device last seen two hours before.
        Spec::new(7, 60, &[(Anon, "y1"), (Device, "d1")]),
        Spec::new(8, 60 + 7_200, &[(Anon, "y2"), (Device, "d1")]),
    ];
    slice.produce(&specs, |_| Some(0)).await?;
    let config = slice.config("rules", rules);
    let (stop, task) = spawn(config.clone());
    slice.caught_up(&config, WAIT).await?;
    stop.trigger();
    task.await??;
    let pool = slice.pool(&config).await?;
    let refusals: Vec<(Uuid, String, Option<String>)> = sqlx::query_as(
        "SELECT event_id, reason, rule_kind FROM identity_refusals ORDER BY event_id",
    )
    .fetch_all(&pool)
    .await?;
    let got: BTreeMap<Uuid, (String, Option<String>)> =
        refusals.into_iter().map(|(e, r, k)| (e, (r, k))).collect();
    let want: BTreeMap<Uuid, (String, Option<String>)> = [
        (
            specs[1].event_id,
            ("unique".to_owned(), Some("USER_ID".to_owned())),
        ),
        (
            specs[4].event_id,
            ("limit".to_owned(), Some("EMAIL".to_owned())),
        ),
        (specs[5].event_id, ("blocked".to_owned(), None)),
        (specs[7].event_id, ("expired".to_owned(), None)),
    ]
    .into();
    assert_eq!(got, want);
    let p = slice
        .profiles(
            &pool,
            &[
                (User, "u1"),
                (Email, "shared@example.org"),
                (User, "u2"),
                (Email, "c@example.org"),
                (Anon, "y1"),
                (Anon, "y2"),
            ],
        )
        .await?;
    assert_eq!(p[0], p[1], "the email stays with the first user");
    assert_ne!(p[2], p[1]);
    assert_eq!(p[3], None, "the third email belongs to no profile");
    assert_ne!(p[4], p[5], "the expired device did not link");
    pool.close().await;
    slice.db.drop_db().await
}

/// 1,000 people, each an anonymous id and a device seen together, and each also sending the
/// same junk email.
fn mega(slice_specs: &mut Vec<Spec>) {
    for p in 0..1_000u128 {
        let anon = format!("anon-{p}");
        let dev = format!("device-{p}");
        slice_specs.push(Spec::new(
            p * 2,
            (p * 2) as i64,
            &[(Anon, &anon), (Device, &dev)],
        ));
        slice_specs.push(Spec::new(
            p * 2 + 1,
            (p * 2 + 1) as i64,
            &[(Anon, &anon), (Email, "test@example.com")],
        ));
    }
}

async fn distinct_profiles(slice: &IdSlice, pool: &sqlx::PgPool) -> anyhow::Result<usize> {
    let mut all = BTreeSet::new();
    for p in 0..1_000 {
        let anon = format!("anon-{p}");
        let dev = format!("device-{p}");
        let got = slice
            .profiles(pool, &[(Anon, &anon), (Device, &dev)])
            .await?;
        assert_eq!(got[0], got[1], "person {p}'s device stays with them");
        all.insert(got[0]);
    }
    Ok(all.len())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_junk_email_merges_1000_people_only_when_unblocked_and_a_split_restores_them(
) -> anyhow::Result<()> {
    let slice = IdSlice::create(None).await?;
    let mut specs = Vec::new();
    mega(&mut specs);
    slice.produce(&specs, |i| Some((i % 6) as i32)).await?;

    // Blocked (the default rules): 1,000 profiles, 1,000 refusals recorded.
    let blocked = slice.config("blocked", IdSlice::default_rules());
    let (stop, task) = spawn(blocked.clone());
    slice.caught_up(&blocked, WAIT).await?;
    stop.trigger();
    task.await??;
    let pool = slice.pool(&blocked).await?;
    assert_eq!(distinct_profiles(&slice, &pool).await?, 1_000);
    let (refused,): (i64,) =
        sqlx::query_as("SELECT count(*) FROM identity_refusals WHERE reason = 'blocked'")
            .fetch_one(&pool)
            .await?;
    assert_eq!(refused, 1_000);
    pool.close().await;

    // Unblocked and unlimited: one profile.
    let mut open = IdSlice::default_rules();
    open.blocked = Vec::new();
    open.limits = Vec::new();
    let unblocked = slice.config("unblocked", open);
    let (stop, task) = spawn(unblocked.clone());
    slice.caught_up(&unblocked, WAIT).await?;
    let pool = slice.pool(&unblocked).await?;
    assert_eq!(distinct_profiles(&slice, &pool).await?, 1);

    // Split the junk email off: the 1,000 people again, each with their own device.
    let report = cdp_identity::split(
        &unblocked,
        SplitTarget::Identifier(Email, None, "Test@Example.com".to_owned()),
        "junk email",
    )
    .await?;
    assert_eq!(report.profiles_after, 1_000);
    assert_eq!(distinct_profiles(&slice, &pool).await?, 1_000);
    for p in [0, 500, 999] {
        let anon = format!("anon-{p}");
        let got = slice.profiles(&pool, &[(Anon, &anon)]).await?;
        assert_eq!(got[0], Some(slice.profile_of(&[(Anon, &anon)]).await?));
    }
    // The running service relays the ProfileSplit events.
    slice.caught_up(&unblocked, WAIT).await?;
    stop.trigger();
    task.await??;
    let events = identity_events(&slice).await?;
    let moved: usize = events
        .iter()
        .filter_map(|e| match &e.payload {
            IdentityPayload::ProfileSplit(s) => Some(s.moved_profile_ids.len()),
            _ => None,
        })
        .sum();
    assert_eq!(
        moved, 999,
        "everyone but the surviving profile's own subject moves"
    );
    pool.close().await;
    slice.db.drop_db().await
}

fn probe(
    slice: &IdSlice,
    config: &cdp_identity::IdentityConfig,
) -> anyhow::Result<std::process::Child> {
    Ok(
        std::process::Command::new(env!("CARGO_BIN_EXE_identity-probe"))
            .env("CDP_KAFKA_BROKERS", brokers())
            .env("CDP_TOPIC_PREFIX", &config.kafka.topic_prefix)
            .env("CDP_DATABASE_URL", &slice.db.url)
            .env("CDP_MASTER_KEY", &slice.key_args.master_key)
            .env("CDP_IDENTIFIER_KEY", &slice.key_args.identifier_key)
            .env("CDP_IDENTITY_GROUP", &config.identity.group)
            .env("CDP_IDENTITY_SCHEMA", &config.identity.schema)
            .env("CDP_BATCH_SIZE", "300")
            .env("CDP_BATCH_SIZE_MAX", "3000")
            .stdin(std::process::Stdio::null())
            .spawn()?,
    )
}

async fn observed(pool: &sqlx::PgPool) -> anyhow::Result<i64> {
    let (n,): (i64,) = sqlx::query_as("SELECT count(*) FROM identity_observations")
        .fetch_one(pool)
        .await?;
    Ok(n)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_50000_events_gives_the_graph_and_stream_of_an_uninterrupted_run(
) -> anyhow::Result<()> {
    use rand::Rng;
    const N: usize = 50_000;
    let specs = workload(N, 8_000, 11);
    let reference = IdSlice::create(None).await?;
    let killed = IdSlice::create(Some(&reference)).await?;
    reference.produce(&specs, |_| None).await?;
    killed.produce(&specs, |_| None).await?;

    let rc = reference.config("reference", IdSlice::default_rules());
    let (stop, task) = spawn(rc.clone());
    reference.caught_up(&rc, Duration::from_secs(300)).await?;
    stop.trigger();
    task.await??;
    let want = cdp_identity::store::digest(&reference.pool(&rc).await?).await?;

    let kc = killed.config("killed", IdSlice::default_rules());
    let kpool = killed.pool(&kc).await?;
    let mut rng = rand::rng();
    let mut points: Vec<i64> = (0..5)
        .map(|_| rng.random_range(2_000..(N as i64) * 9 / 10))
        .collect();
    points.sort_unstable();
    for (i, point) in points.iter().enumerate() {
        let mut child = probe(&killed, &kc)?;
        wait_until(
            &format!("{point} resolved before kill {}", i + 1),
            Duration::from_secs(300),
            || async { Ok(observed(&kpool).await? >= *point) },
        )
        .await?;
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..80))).await;
        child.kill()?;
        child.wait()?;
        let done = observed(&kpool).await?;
        eprintln!(
            "kill {}: SIGKILL at >= {point} resolved; {done} after",
            i + 1
        );
        assert!(done < N as i64, "finished before kill {}", i + 1);
    }
    let mut child = probe(&killed, &kc)?;
    killed.caught_up(&kc, Duration::from_secs(300)).await?;
    child.kill()?;
    child.wait()?;
    assert_eq!(
        cdp_identity::store::digest(&killed.pool(&kc).await?).await?,
        want,
        "five SIGKILLs change nothing in the graph"
    );
    let out = resolved(&killed).await?;
    let ids: BTreeSet<Uuid> = out.iter().map(|r| r.0).collect();
    assert_eq!(
        ids.len(),
        out.len(),
        "no event twice in the resolved stream"
    );
    assert_eq!(ids.len(), N, "every event in the resolved stream");
    reference.db.drop_db().await?;
    killed.db.drop_db().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_in_one_group_give_the_graph_of_one() -> anyhow::Result<()> {
    const N: usize = 12_000;
    let specs = workload(N, 2_000, 5);
    let one = IdSlice::create(None).await?;
    let two = IdSlice::create(Some(&one)).await?;
    one.produce(&specs, |_| None).await?;
    two.produce(&specs, |_| None).await?;

    let c1 = one.config("single", IdSlice::default_rules());
    let (stop, task) = spawn(c1.clone());
    one.caught_up(&c1, Duration::from_secs(300)).await?;
    stop.trigger();
    task.await??;

    let c2 = two.config("pair", IdSlice::default_rules());
    let (stop_a, task_a) = spawn(c2.clone());
    let (stop_b, task_b) = spawn(c2.clone());
    two.caught_up(&c2, Duration::from_secs(300)).await?;
    stop_a.trigger();
    stop_b.trigger();
    task_a.await??;
    task_b.await??;
    assert_eq!(
        cdp_identity::store::digest(&two.pool(&c2).await?).await?,
        cdp_identity::store::digest(&one.pool(&c1).await?).await?
    );
    let out = resolved(&two).await?;
    let ids: BTreeSet<Uuid> = out.iter().map(|r| r.0).collect();
    assert_eq!((ids.len(), out.len()), (N, N), "each event once");
    one.db.drop_db().await?;
    two.db.drop_db().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_shows_a_profiles_identifiers_to_operators_only() -> anyhow::Result<()> {
    let slice = IdSlice::create(None).await?;
    let specs = vec![
        Spec::new(1, 0, &[(Anon, "a1"), (Email, "ada@example.org")]),
        Spec::new(2, 5, &[(User, "ada"), (Email, "ada@example.org")]),
    ];
    slice.produce(&specs, |_| Some(0)).await?;
    let config = slice.config("api", IdSlice::default_rules());
    let (stop, task) = spawn(config.clone());
    slice.caught_up(&config, WAIT).await?;
    let tokens = vec!["ops:operator:s3cret".to_owned(), "app:read:r3ad".to_owned()];
    let api = cdp_identity::IdentityApiArgs {
        identity_api_addr: "127.0.0.1:0".to_owned(),
    };
    let Some((addr, serve)) = cdp_identity::bind_api(
        &config.pg,
        &config.identity.schema,
        &api,
        &tokens,
        stop.clone(),
    )
    .await?
    else {
        anyhow::bail!("the API is on");
    };
    let server = tokio::spawn(serve);
    let profile = slice.profile_of(&[(Anon, "a1")]).await?;
    let http = reqwest::Client::new();
    let url = format!("http://{addr}/v1/identity/{profile}");
    assert_eq!(http.get(&url).send().await?.status(), 401);
    assert_eq!(
        http.get(&url).bearer_auth("r3ad").send().await?.status(),
        403
    );
    let unknown = format!("http://{addr}/v1/identity/{}", Uuid::from_u128(9));
    assert_eq!(
        http.get(&unknown)
            .bearer_auth("s3cret")
            .send()
            .await?
            .status(),
        404
    );
    let r = http.get(&url).bearer_auth("s3cret").send().await?;
    assert_eq!(r.status(), 200);
    let body: serde_json::Value = r.json().await?;
    let kinds: BTreeSet<&str> = body["identifiers"]
        .as_array()
        .map(|a| a.iter().filter_map(|i| i["kind"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(kinds, ["ANONYMOUS_ID", "EMAIL", "USER_ID"].into());
    let links = body["links"].as_array().map(Vec::len).unwrap_or(0);
    assert_eq!(links, 2, "each link with the event that made it");
    assert!(!body.to_string().contains("ada@example.org"), "hashes only");
    stop.trigger();
    task.await??;
    server.await??;
    slice.db.drop_db().await
}

/// Track events with chosen identifiers, sealed and published as ingest does.
async fn publish_tracks(
    slice: &cdp_integration_tests::projector::Slice,
    specs: &[Spec],
) -> anyhow::Result<()> {
    let drafts = specs
        .iter()
        .enumerate()
        .map(|(i, s)| cdp_integration_tests::identity::track_draft(s, i, "test"))
        .collect();
    let prepared = slice.publisher.prepare(drafts).await?;
    slice.produce(&prepared, |_| Some(0)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_projector_follows_a_merge_and_its_split() -> anyhow::Result<()> {
    use cdp_integration_tests::projector::Slice;
    let slice = Slice::create().await?;
    publish_tracks(
        &slice,
        &[
            Spec::new(1, 0, &[(Anon, "a1")]),
            Spec::new(2, 1, &[(Anon, "a2")]),
            Spec::new(3, 2, &[(Anon, "a1"), (Email, "family@example.org")]),
            Spec::new(4, 3, &[(Anon, "a2"), (Email, "family@example.org")]),
        ],
    )
    .await?;
    let ic = identity_for(&slice.kafka, &slice.db, &slice.key_args, "id_follow");
    let (stop_i, task_i) = spawn(ic.clone());
    let pc = slice.config("follow");
    let (stop_p, task_p) = cdp_integration_tests::projector::spawn(pc.clone());
    let (p1, p2) = (
        cdp_schemas::profile_id_of(&cdp_integration_tests::token(&slice.vault, Anon, "a1").await?),
        cdp_schemas::profile_id_of(&cdp_integration_tests::token(&slice.vault, Anon, "a2").await?),
    );
    let count = |p: Uuid| {
        let pool = slice.db.pool.clone();
        async move {
            let (n,): (i64,) = sqlx::query_as(
                "SELECT count(*) FROM p_follow_read.interactions WHERE profile_id = $1",
            )
            .bind(p)
            .fetch_one(&pool)
            .await?;
            anyhow::Ok(n)
        }
    };
    slice.caught_up(&pc, WAIT).await?;
    wait_until("the merge reached the read model", WAIT, || async {
        Ok(count(p1).await? == 4 && count(p2).await? == 0)
    })
    .await?;

    cdp_identity::split(
        &ic,
        SplitTarget::Identifier(Email, None, "family@example.org".to_owned()),
        "shared family email",
    )
    .await?;
    wait_until("the split reached the read model", WAIT, || async {
        Ok(count(p1).await? == 2 && count(p2).await? == 2)
    })
    .await?;
    stop_i.trigger();
    stop_p.trigger();
    task_i.await??;
    task_p.await??;
    slice.db.drop_db().await
}

/// One person's identify event for the candidate test.
struct Person {
    n: u128,
    ids: Vec<(IdentifierKind, &'static str)>,
    first: &'static str,
    last: &'static str,
    street: Option<&'static str>,
    postal: &'static str,
    country: &'static str,
    birth: Option<&'static str>,
}

async fn publish_identifies(
    slice: &cdp_integration_tests::projector::Slice,
    people: &[Person],
) -> anyhow::Result<()> {
    use cdp_ingest::publisher::{envelope, plain, Draft};
    use cdp_keystore::RawIdentifier;
    use cdp_schemas::model::customer::Identify;
    use cdp_schemas::CustomerPayload;
    let drafts: Vec<Draft<CustomerEvent>> = people
        .iter()
        .map(|p| {
            let at =
                cdp_integration_tests::identity::origin() + chrono::Duration::seconds(p.n as i64);
            let email = p.ids.iter().find(|i| i.0 == Email).map(|i| i.1);
            Draft {
                event: CustomerEvent {
                    envelope: envelope(Uuid::from_u128(0xca00 + p.n), at, at, "test"),
                    payload: CustomerPayload::Identify(Identify {
                        first_name: plain(p.first),
                        last_name: plain(p.last),
                        email: email.and_then(plain),
                        street: p.street.and_then(plain),
                        postal_code: plain(p.postal),
                        birth_date: p.birth.and_then(plain),
                        country: Some(p.country.to_owned()),
                        ..Identify::default()
                    }),
                },
                references: Vec::new(),
                identifiers: p
                    .ids
                    .iter()
                    .map(|(k, v)| RawIdentifier::new(*k, *v))
                    .collect(),
            }
        })
        .collect();
    let prepared = slice.publisher.prepare(drafts).await?;
    // Keyed by subject, as ingest and the publisher key them: one subject's events arrive in
    // order, different subjects' in any order. (A subject's events spread over partitions
    // can arrive after a later one of its own; identity then re-derives, but an identifier
    // that leaves a profile that way keeps the projector's claim, for identity publishes no
    // event when a re-derivation drops an identifier.)
    slice.produce(&prepared, |_| None).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fuzzy_duplicates_are_scored_from_the_read_model_and_merged_only_over_the_threshold(
) -> anyhow::Result<()> {
    use cdp_integration_tests::projector::Slice;
    let slice = Slice::create().await?;
    let p = |n, ids, first, last, street, postal, country, birth| Person {
        n,
        ids,
        first,
        last,
        street,
        postal,
        country,
        birth,
    };
    let people = vec![
        p(
            1,
            vec![(User, "u-1"), (Email, "john.smith@a.example")],
            "John",
            "Smith",
            Some("12 High Street"),
            "SW1A 1AA",
            "GB",
            Some("1980-01-02"),
        ),
        // The same man signed up again: a typo, another email, the street abbreviated.
        p(
            2,
            vec![(Anon, "a-2"), (Email, "jon.smith@b.example")],
            "Jon",
            "Smith",
            Some("12 High St."),
            "sw1a1aa",
            "GB",
            Some("1980-01-02"),
        ),
        // His father: same name and address, another birth date.
        p(
            3,
            vec![(Anon, "a-3"), (Email, "senior@c.example")],
            "John",
            "Smith",
            Some("12 High Street"),
            "SW1A 1AA",
            "GB",
            Some("1950-05-05"),
        ),
        p(
            4,
            vec![(Anon, "a-4"), (Email, "mary@d.example")],
            "Mary",
            "Jones",
            Some("12 High Street"),
            "SW1A 1AA",
            "GB",
            None,
        ),
        // A namesake elsewhere: another block.
        p(
            5,
            vec![(Anon, "a-5"), (Email, "john@e.example")],
            "John",
            "Smith",
            Some("1 Old Road"),
            "EC1A 1BB",
            "GB",
            Some("1980-01-02"),
        ),
        // Similar names, nothing else to go on: reported, never merged automatically.
        p(
            6,
            vec![(Anon, "a-6"), (Email, "anna@f.example")],
            "Anna",
            "Berg",
            None,
            "10115",
            "DE",
            None,
        ),
        p(
            7,
            vec![(Anon, "a-7"), (Email, "ana@g.example")],
            "Ana",
            "Berg",
            None,
            "10 115",
            "DE",
            None,
        ),
        // Twins of record with two user ids: a merge the unique rule refuses.
        p(
            8,
            vec![(User, "u-8"), (Email, "lena@h.example")],
            "Lena",
            "Koch",
            Some("Hauptstraße 5"),
            "80331",
            "DE",
            Some("1990-09-09"),
        ),
        p(
            9,
            vec![(User, "u-9"), (Email, "lena.koch@i.example")],
            "Lena",
            "Koch",
            Some("Hauptstrasse 5"),
            "80331",
            "DE",
            Some("1990-09-09"),
        ),
    ];
    publish_identifies(&slice, &people).await?;
    let mut ic = identity_for(&slice.kafka, &slice.db, &slice.key_args, "id_cand");
    ic.identity.candidates = cdp_identity::candidates::CandidateArgs {
        source: "p_cand_read".to_owned(),
        every_secs: 0,
        ..cdp_identity::candidates::CandidateArgs::default()
    };
    let (stop_i, task_i) = spawn(ic.clone());
    let pc = slice.config("cand");
    let (stop_p, task_p) = cdp_integration_tests::projector::spawn(pc.clone());
    // Identity's links (which email is whose) reach the read model through the projector.
    slice.caught_up_with_identity(&ic, &pc, WAIT).await?;
    let graph = cdp_identity::pool(&ic.pg, &ic.identity.schema).await?;
    let (observed,): (i64,) = sqlx::query_as("SELECT count(*) FROM identity_observations")
        .fetch_one(&graph)
        .await?;
    assert_eq!(
        observed,
        people.len() as i64,
        "identity observed every event"
    );
    // The read model's profile of an email (by its token: a merged profile keeps one email
    // trait).
    let profile = |email: &'static str| {
        let pool = slice.db.pool.clone();
        let vault = slice.vault.clone();
        async move {
            let token = cdp_integration_tests::token(&vault, Email, email).await?;
            let (id,): (Uuid,) = sqlx::query_as(
                "SELECT profile_id FROM p_cand_read.customer_identities WHERE kind = 'EMAIL' AND token = $1",
            )
            .bind(token)
            .fetch_one(&pool)
            .await?;
            anyhow::Ok(id)
        }
    };
    let pair = |a: Uuid, b: Uuid| if a < b { (a, b) } else { (b, a) };
    let smith = pair(
        profile("john.smith@a.example").await?,
        profile("jon.smith@b.example").await?,
    );
    let berg = pair(
        profile("anna@f.example").await?,
        profile("ana@g.example").await?,
    );
    let koch = pair(
        profile("lena@h.example").await?,
        profile("lena.koch@i.example").await?,
    );
    let open = || async {
        let rows: Vec<(Uuid, Uuid, String)> = sqlx::query_as(
            "SELECT profile_a, profile_b, status FROM identity_candidates ORDER BY score DESC, profile_a",
        )
        .fetch_all(&graph)
        .await?;
        anyhow::Ok(
            rows.into_iter()
                .map(|(a, b, s)| ((a, b), s))
                .collect::<BTreeMap<_, _>>(),
        )
    };

    // Reported only.
    let r = cdp_identity::sweep_candidates(&ic).await?;
    assert!(r.swept);
    assert_eq!(
        (r.profiles, r.blocks, r.candidates, r.merges),
        (9, 4, 3, 0),
        "{r:?}"
    );
    let expected: BTreeMap<_, _> = [smith, berg, koch]
        .into_iter()
        .map(|p| (p, "open".to_owned()))
        .collect();
    assert_eq!(
        open().await?,
        expected,
        "the father, Mary and the other John are no candidates"
    );

    // The API lists them, best first, a page at a time.
    let tokens = vec!["ops:operator:s3cret".to_owned(), "app:read:r3ad".to_owned()];
    let api = cdp_identity::IdentityApiArgs {
        identity_api_addr: "127.0.0.1:0".to_owned(),
    };
    let Some((addr, serve)) =
        cdp_identity::bind_api(&ic.pg, &ic.identity.schema, &api, &tokens, stop_i.clone()).await?
    else {
        anyhow::bail!("the API is on");
    };
    let server = tokio::spawn(serve);
    let http = reqwest::Client::new();
    let url = format!("http://{addr}/v1/identity/candidates");
    assert_eq!(
        http.get(&url).bearer_auth("r3ad").send().await?.status(),
        403
    );
    let mut seen = Vec::new();
    let mut next: Option<String> = None;
    for _ in 0..5 {
        // Cursors are digits, hex, '.', '-' and '_': nothing to escape.
        let page = match &next {
            Some(c) => format!("{url}?limit=2&after={c}"),
            None => format!("{url}?limit=2"),
        };
        let body: serde_json::Value = http
            .get(&page)
            .bearer_auth("s3cret")
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        for c in body["candidates"].as_array().into_iter().flatten() {
            seen.push((
                c["score"].as_f64().unwrap_or(-1.0),
                c["profile_a"].as_str().unwrap_or("").to_owned(),
            ));
        }
        next = body["next"].as_str().map(str::to_owned);
        if next.is_none() {
            break;
        }
    }
    assert_eq!(
        seen.len(),
        3,
        "every candidate once over the pages: {seen:?}"
    );
    assert!(
        seen.windows(2).all(|w| w[0].0 >= w[1].0),
        "best first: {seen:?}"
    );

    // With an automatic-merge threshold: the corroborated pairs get an alias event; the
    // graph merges the Smiths, the unique rule keeps the two user ids apart.
    ic.identity.candidates.automerge = Some(0.95);
    let r = cdp_identity::sweep_candidates(&ic).await?;
    assert_eq!(r.merges, 2, "{r:?}");
    let same_profile = || async {
        Ok(profile("john.smith@a.example").await? == profile("jon.smith@b.example").await?)
    };
    wait_until(
        "the read model follows the automatic merge",
        WAIT,
        same_profile,
    )
    .await?;
    let (refused,): (i64,) = sqlx::query_as(
        "SELECT count(*) FROM identity_refusals r JOIN identity_candidates c ON c.merge_event_id = r.event_id
          WHERE r.reason = 'unique'",
    )
    .fetch_one(&graph)
    .await?;
    assert_eq!(
        refused, 1,
        "the Kochs' alias is refused by the unique rule, and recorded"
    );
    assert_ne!(
        profile("lena@h.example").await?,
        profile("lena.koch@i.example").await?
    );

    // The next sweep publishes nothing again; the Bergs stay an open candidate.
    slice.caught_up(&pc, WAIT).await?;
    let r = cdp_identity::sweep_candidates(&ic).await?;
    assert_eq!(r.merges, 0);
    let after = open().await?;
    assert_eq!(after.get(&berg).map(String::as_str), Some("open"));
    assert_eq!(
        after.get(&smith).map(String::as_str),
        Some("alias_published")
    );
    assert_eq!(
        after.get(&koch).map(String::as_str),
        Some("alias_published")
    );

    stop_i.trigger();
    stop_p.trigger();
    task_i.await??;
    task_p.await??;
    server.await??;
    graph.close().await;
    slice.db.drop_db().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identifiers_a_pattern_blocks_at_ingest_never_link_and_the_refusal_is_recorded(
) -> anyhow::Result<()> {
    use cdp_integration_tests::ingest::{Ingest, Options};
    let ing = Ingest::start_with(Options {
        blocked_patterns: vec![r"email:^test(\+.*)?@example\.com$".to_owned()],
        ..Options::default()
    })
    .await?;
    // Two visitors give the same junk email (spelled differently), two others share a real one.
    let people = [
        ("a-1", " Test+Promo@Example.com"),
        ("a-2", "test+promo@example.com"),
        ("a-3", "shared@corp.example"),
        ("a-4", "Shared@Corp.example"),
    ];
    for (anon, email) in people {
        let body = serde_json::json!({"anonymousId": anon, "traits": {"email": email}});
        let (status, answer) = ing.post("/v1/identify", &body).await?;
        assert_eq!(status, 200, "{answer}");
    }
    let config = identity_for(&ing.kafka, &ing.db, &ing.key_args, "id_patterns");
    let (stop, task) = spawn(config.clone());
    let pool = cdp_identity::pool(&config.pg, &config.identity.schema).await?;
    wait_until("identity observed the four events", WAIT, || async {
        let (n,): (i64,) = sqlx::query_as("SELECT count(*) FROM identity_observations")
            .fetch_one(&pool)
            .await?;
        Ok(n == 4)
    })
    .await?;
    let profile = |anon: &'static str| {
        let pool = pool.clone();
        let ing = &ing;
        async move {
            let token = ing.token(Anon, anon).await?;
            let (p,): (Option<Uuid>,) = sqlx::query_as(
                "SELECT profile_id FROM identity_nodes WHERE kind = 'ANONYMOUS_ID' AND token = $1",
            )
            .bind(token)
            .fetch_one(&pool)
            .await?;
            anyhow::Ok(p)
        }
    };
    assert_ne!(
        profile("a-1").await?,
        profile("a-2").await?,
        "the junk email links no one"
    );
    assert_eq!(
        profile("a-3").await?,
        profile("a-4").await?,
        "a real shared email links"
    );
    let refused: Vec<(String, String)> = sqlx::query_as(
        "SELECT n.kind, r.reason FROM identity_refusals r JOIN identity_nodes n ON n.node_id = r.node
          ORDER BY r.event_id",
    )
    .fetch_all(&pool)
    .await?;
    assert_eq!(
        refused,
        vec![("EMAIL".to_owned(), "blocked".to_owned()); 2],
        "each junk email event's refusal is recorded"
    );
    // The identifier itself stays on the event (and in read models): only linking is refused.
    let records = consume(&ing.topic(Topic::CustomerEvents), 4, WAIT).await?;
    let flagged = records
        .iter()
        .filter(|r| {
            r.headers
                .get(cdp_keystore::identifiers::BLOCKED_HEADER)
                .is_some_and(|v| !v.is_empty())
        })
        .count();
    assert_eq!(
        flagged, 2,
        "ingest names the junk email in the header of its two events"
    );
    stop.trigger();
    task.await??;
    pool.close().await;
    ing.stop().await
}

/// Events for the refusal test: tracks with chosen identifiers, and one alias.
async fn publish_specs_and_alias(
    slice: &cdp_integration_tests::projector::Slice,
    specs: &[Spec],
    alias: (u128, i64, &str, &str),
) -> anyhow::Result<()> {
    use cdp_ingest::publisher::{envelope, Draft};
    use cdp_schemas::model::customer::Alias;
    use cdp_schemas::CustomerPayload;
    let mut drafts: Vec<Draft<CustomerEvent>> = specs
        .iter()
        .enumerate()
        .map(|(i, s)| cdp_integration_tests::identity::track_draft(s, i, "test"))
        .collect();
    let (n, secs, user, previous) = alias;
    let at = cdp_integration_tests::identity::origin() + chrono::Duration::seconds(secs);
    drafts.push(Draft {
        event: CustomerEvent {
            envelope: envelope(Uuid::from_u128(0xa11a5 + n), at, at, "test"),
            payload: CustomerPayload::Alias(Alias {
                previous: cdp_schemas::Identifier {
                    kind: User,
                    namespace: None,
                    token: String::new(),
                },
            }),
        },
        references: vec![cdp_keystore::RawIdentifier::new(User, previous)],
        identifiers: vec![cdp_keystore::RawIdentifier::new(User, user)],
    });
    let prepared = slice.publisher.prepare(drafts).await?;
    // Keyed by subject, as ingest and the publisher key them: one subject's events arrive in
    // order, different subjects' in any order. (A subject's events spread over partitions
    // can arrive after a later one of its own; identity then re-derives, but an identifier
    // that leaves a profile that way keeps the projector's claim, for identity publishes no
    // event when a re-derivation drops an identifier.)
    slice.produce(&prepared, |_| None).await
}

/// The projector follows identity's decisions: an identifier whose link a rule refuses is
/// not given to the profile of the event that carried it, so a lookup by it never returns
/// that profile (a refused alias made `?user_id=<previous id>` return another person).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_projector_follows_identitys_refusals() -> anyhow::Result<()> {
    use cdp_integration_tests::projector::Slice;
    let slice = Slice::create().await?;
    let specs = vec![
        // unique (alias): B exists; an alias names a new user id as B's previous one, which
        // would give B a second user id. A arrives later with that user id.
        Spec::new(1, 0, &[(User, "u-b"), (Email, "b@example.org")]),
        Spec::new(3, 20, &[(User, "u-a"), (Email, "a@example.org")]),
        // unique (event): C shows B's email.
        Spec::new(4, 30, &[(User, "u-c"), (Email, "b@example.org")]),
        // limit: a third email for D (the test allows two).
        Spec::new(5, 40, &[(User, "u-d"), (Email, "d1@example.org")]),
        Spec::new(6, 41, &[(User, "u-d"), (Email, "d2@example.org")]),
        Spec::new(7, 42, &[(User, "u-d"), (Email, "d3@example.org")]),
        // blocked: the default list has test@example.com.
        Spec::new(8, 50, &[(User, "u-e"), (Email, "TEST@example.com")]),
        // expired: the device last linked two hours before (the test's TTL is one hour).
        Spec::new(9, 60, &[(User, "u-y1"), (Device, "dev-1")]),
        Spec::new(10, 60 + 7_200, &[(User, "u-y2"), (Device, "dev-1")]),
        // an anonymous session that links normally, for contrast.
        Spec::new(11, 70, &[(User, "u-g"), (Anon, "anon-g")]),
    ];
    publish_specs_and_alias(&slice, &specs, (2, 10, "u-b", "u-a")).await?;
    let mut ic = identity_for(&slice.kafka, &slice.db, &slice.key_args, "id_refusals");
    ic.identity.rules.limits = vec!["email=2".to_owned()];
    ic.identity.rules.ttl = vec!["device_id=1h".to_owned()];
    let (stop_i, task_i) = spawn(ic.clone());
    let pc = slice.config("refusals");
    let (stop_p, task_p) = cdp_integration_tests::projector::spawn(pc.clone());
    slice.caught_up_with_identity(&ic, &pc, WAIT).await?;

    // A severed identifier: an operator splits G's anonymous id off; a later event of another
    // user carrying it is refused.
    cdp_identity::split(
        &ic,
        SplitTarget::Identifier(Anon, None, "anon-g".to_owned()),
        "shared kiosk",
    )
    .await?;
    let severed = vec![Spec::new(12, 80, &[(User, "u-h"), (Anon, "anon-g")])];
    publish_tracks(&slice, &severed).await?;
    slice.caught_up_with_identity(&ic, &pc, WAIT).await?;

    let pool = cdp_identity::pool(&ic.pg, &ic.identity.schema).await?;
    let (refusals,): (Vec<String>,) =
        sqlx::query_as("SELECT array_agg(DISTINCT reason ORDER BY reason) FROM identity_refusals")
            .fetch_one(&pool)
            .await?;
    assert_eq!(
        refusals,
        ["blocked", "expired", "limit", "severed", "unique"],
        "every refusal kind happened"
    );
    pool.close().await;

    // Through the profile API, as the outside tester did.
    let shutdown = cdp_runtime::Shutdown::new();
    let api = cdp_projector::ApiArgs {
        api_addr: "127.0.0.1:0".parse()?,
        api_tokens: vec!["analyst:read:s3cret".into()],
    };
    let (addr, serve) = cdp_projector::bind_api(
        &slice.db.args(),
        &slice.key_args,
        "p_refusals",
        &api,
        shutdown.clone(),
    )
    .await?;
    let server = tokio::spawn(serve);
    let client = reqwest::Client::new();
    let lookup = |query: &'static str| {
        let req = client
            .get(format!("http://{addr}/v1/profiles?{query}"))
            .bearer_auth("s3cret");
        async move {
            let resp = req.send().await?;
            let status = resp.status().as_u16();
            let body: serde_json::Value = resp.json().await.unwrap_or_default();
            anyhow::Ok((status, body["profile_id"].as_str().map(str::to_owned)))
        }
    };
    let profile = |kind, v: &'static str| {
        let vault = slice.vault.clone();
        async move {
            let token = cdp_integration_tests::token(&vault, kind, v).await?;
            anyhow::Ok(cdp_schemas::profile_id_of(&token).to_string())
        }
    };
    let found = |p: String| (200u16, Some(p));
    assert_eq!(
        lookup("user_id=u-a").await?,
        found(profile(User, "u-a").await?),
        "the refused alias's previous id is A's, not B's"
    );
    assert_eq!(
        lookup("email=b%40example.org").await?,
        found(profile(User, "u-b").await?),
        "B's email stays B's"
    );
    assert_eq!(
        lookup("email=d2%40example.org").await?,
        found(profile(User, "u-d").await?)
    );
    assert_eq!(
        lookup("email=d3%40example.org").await?.0,
        404,
        "an email over the limit belongs to no profile"
    );
    assert_eq!(
        lookup("email=test%40example.com").await?.0,
        404,
        "a blocked value belongs to no profile"
    );
    let (status, owner) = lookup("anonymous_id=anon-g").await?;
    assert!(
        !(status == 200 && owner == Some(profile(User, "u-h").await?)),
        "a severed identifier is not given to the user who showed it after the split"
    );
    // B lists its own identifiers only: its user id and its email.
    let b = profile(User, "u-b").await?;
    let body: serde_json::Value = client
        .get(format!("http://{addr}/v1/profiles/{b}"))
        .bearer_auth("s3cret")
        .send()
        .await?
        .json()
        .await?;
    let kinds: BTreeSet<String> = body["identities"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|i| i["kind"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(
        body["identities"].as_array().map(Vec::len),
        Some(2),
        "{body}"
    );
    assert_eq!(kinds, ["EMAIL".to_owned(), "USER_ID".to_owned()].into());
    // The expired device stays with the profile that linked it first.
    let (device_owner,): (Uuid,) = sqlx::query_as(
        "SELECT profile_id FROM p_refusals_read.customer_identities WHERE kind = 'DEVICE_ID'",
    )
    .fetch_one(&slice.db.pool)
    .await?;
    assert_eq!(device_owner.to_string(), profile(User, "u-y1").await?);

    shutdown.trigger();
    server.await??;
    stop_i.trigger();
    stop_p.trigger();
    task_i.await??;
    task_p.await??;
    slice.db.drop_db().await
}

/// The identity service's outbox relay puts every keyed record where our producer and Kafka's
/// Java clients put a record of that key: on the identity topic (which erasure's tombstones and
/// any other writer share) and on the resolved stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_outbox_relay_partitions_keys_as_the_producer_does() -> anyhow::Result<()> {
    use cdp_runtime::kafka::partition::partition_of;
    let slice = IdSlice::create(None).await?;
    let specs: Vec<Spec> = (0..120u128)
        .map(|i| {
            let user = format!("u{}", i % 40);
            let email = format!("p{}@example.org", i % 40);
            let anon = format!("a{}", i % 60);
            Spec::new(
                i,
                i as i64,
                &[(User, &user), (Email, &email), (Anon, &anon)],
            )
        })
        .collect();
    slice.produce(&specs, |_| None).await?;
    let config = slice.config("partitions", IdSlice::default_rules());
    let (stop, task) = spawn(config.clone());
    slice.caught_up(&config, WAIT).await?;
    stop.trigger();
    task.await??;
    for t in [Topic::Identity, Topic::ResolvedEvents] {
        let topic = slice.topic(t);
        let n = topic_len(&topic).await? as usize;
        assert!(n > 0, "{topic} is empty");
        let partitions = t.spec().partitions;
        for r in consume(&topic, n, Duration::from_secs(60)).await? {
            let key = r.key.unwrap_or_default();
            assert_eq!(
                r.partition,
                partition_of(&key, partitions),
                "{topic}: key {}",
                String::from_utf8_lossy(&key)
            );
        }
    }
    slice.db.drop_db().await
}

/// After a person is shredded (the key store's part of an erasure), replaying identity from
/// the earliest offset and rebuilding the projector from the earliest offset do not bring
/// them back, not even as a nameless profile: every event naming one of their tokens is
/// skipped (the erasure ledger). Everybody else comes back as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replays_and_rebuilds_skip_an_erased_persons_events() -> anyhow::Result<()> {
    use cdp_integration_tests::projector::Slice;
    let slice = Slice::create().await?;
    slice
        .produce(&slice.prepare(0..700, 7).await?, |_| None)
        .await?;
    let ic = identity_for(&slice.kafka, &slice.db, &slice.key_args, "id_era");
    let pc = slice.config("era");
    let (stop_i, task_i) = spawn(ic.clone());
    let (stop_p, task_p) = cdp_integration_tests::projector::spawn(pc.clone());
    slice.caught_up_with_identity(&ic, &pc, WAIT).await?;
    stop_i.trigger();
    task_i.await??;
    stop_p.trigger();
    task_p.await??;

    // user-3's cluster as identity knows it: user id, emails, anonymous id.
    let user = slice.token(User, "user-3").await?;
    let profile = cdp_schemas::profile_id_of(&user);
    let tokens: Vec<String> = sqlx::query_scalar(
        "SELECT token FROM id_era.identity_nodes WHERE profile_id = $1 ORDER BY token",
    )
    .bind(profile)
    .fetch_all(&slice.db.pool)
    .await?;
    assert_eq!(tokens.len(), 5, "user id, three emails, an anonymous id");
    let count = |sql: &'static str| {
        let pool = slice.db.pool.clone();
        let tokens = tokens.clone();
        async move {
            let n: i64 = sqlx::query_scalar(sql)
                .bind(profile)
                .bind(&tokens)
                .fetch_one(&pool)
                .await?;
            anyhow::Ok(n)
        }
    };
    let others_before = count("SELECT count(*) FROM p_era_read.customers WHERE profile_id <> $1 AND $2::text[] IS NOT NULL").await?;
    assert_eq!(others_before, 6);
    cdp_integration_tests::shred(&slice.db.pool, &slice.key_args, &tokens).await?;

    // Identity from the earliest offset, into a new schema: no node of the person.
    let replay = identity_for(&slice.kafka, &slice.db, &slice.key_args, "id_era_replay");
    let (stop, task) = spawn(replay.clone());
    cdp_integration_tests::identity::caught_up(
        &slice.db.pool,
        &replay,
        &slice.topic(Topic::CustomerEvents),
        WAIT,
    )
    .await?;
    stop.trigger();
    task.await??;
    let nodes = |schema: &str| {
        format!(
            "SELECT count(*) FROM {schema}.identity_nodes WHERE profile_id = $1 OR token = ANY($2)"
        )
    };
    let pool = &slice.db.pool;
    let left: i64 = sqlx::query_scalar(&nodes("id_era_replay"))
        .bind(profile)
        .bind(&tokens)
        .fetch_one(pool)
        .await?;
    assert_eq!(left, 0, "the replayed graph holds nothing of the person");
    let all: (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM id_era.identity_nodes), (SELECT count(*) FROM id_era_replay.identity_nodes)",
    )
    .fetch_one(pool)
    .await?;
    assert_eq!(
        all.1,
        all.0 - tokens.len() as i64,
        "everybody else's nodes are back"
    );

    // The projector rebuilt from the earliest offset: no row of the person.
    let rebuilt = cdp_projector::rebuild(
        pc.clone(),
        cdp_projector::ReplayFrom::Earliest,
        cdp_runtime::Shutdown::new(),
    )
    .await?;
    assert_eq!(rebuilt.generation, 2);
    for (what, sql) in [
        ("customers", "SELECT count(*) FROM p_era_read.customers WHERE profile_id = $1 AND $2::text[] IS NOT NULL"),
        ("traits", "SELECT count(*) FROM p_era_read.customer_traits WHERE profile_id = $1 OR subject_id = ANY($2)"),
        ("identities", "SELECT count(*) FROM p_era_read.customer_identities WHERE profile_id = $1 OR token = ANY($2)"),
        ("interactions", "SELECT count(*) FROM p_era_read.interactions WHERE profile_id = $1 AND $2::text[] IS NOT NULL"),
        ("transactions", "SELECT count(*) FROM p_era_read.transactions WHERE profile_id = $1 AND $2::text[] IS NOT NULL"),
    ] {
        assert_eq!(count(sql).await?, 0, "{what} of the erased person after the rebuild");
    }
    assert_eq!(
        count("SELECT count(*) FROM p_era_read.customers WHERE profile_id <> $1 AND $2::text[] IS NOT NULL").await?,
        others_before,
        "everybody else is rebuilt"
    );
    slice.db.drop_db().await
}
