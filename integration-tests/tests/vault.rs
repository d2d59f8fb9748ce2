//! The identifier vault and the key store's cache invalidation, against the real Postgres.

use std::collections::HashSet;

use cdp_integration_tests::{random_key_args, TestDb};
use cdp_keystore::{KeyStore, Normalized, RawIdentifier, Vault};
use cdp_schemas::IdentifierKind;

fn normalized(vault: &Vault, kind: IdentifierKind, value: &str) -> Normalized {
    vault
        .hasher()
        .identifier(&RawIdentifier::new(kind, value))
        .unwrap_or_else(|e| panic!("{e}"))
}

async fn rows(db: &TestDb) -> anyhow::Result<i64> {
    let (n,): (i64,) = sqlx::query_as("SELECT count(*) FROM identifier_vault")
        .fetch_one(&db.pool)
        .await?;
    Ok(n)
}

/// Two replicas tokenizing overlapping identifiers at once agree on every token; spellings of
/// one identifier share it; kinds keep theirs apart; tokens are random, not derived from the
/// value; and a read-only lookup never creates one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_agree_on_one_random_token_per_identifier() -> anyhow::Result<()> {
    let db = TestDb::create().await?;
    cdp_keystore::store::migrator().run(&db.pool).await?;
    let keys = random_key_args();
    let (a, b) = (keys.vault(db.pool.clone())?, keys.vault(db.pool.clone())?);
    let emails = |range: std::ops::Range<usize>, spell: fn(usize) -> String| {
        range
            .map(|i| normalized(&a, IdentifierKind::Email, &spell(i)))
            .collect::<Vec<_>>()
    };
    let plain = emails(0..2_000, |i| format!("person{i}@example.org"));
    let shouted = emails(1_000..3_000, |i| format!("  Person{i}@EXAMPLE.org "));
    let (ta, tb) = tokio::join!(a.tokens(&plain), b.tokens(&shouted));
    let (ta, tb) = (ta?, tb?);
    assert_eq!(
        ta[1_000..],
        tb[..1_000],
        "replicas share the overlap's tokens"
    );
    let all: HashSet<&String> = ta.iter().chain(&tb).collect();
    assert_eq!(all.len(), 3_000, "one token per identifier");
    assert_eq!(rows(&db).await?, 3_000);
    assert!(ta
        .iter()
        .all(|t| t.len() == 32 && t.bytes().all(|c| c.is_ascii_hexdigit())));
    assert!(
        !ta.iter().any(|t| t.contains("person")),
        "tokens carry nothing of the value"
    );

    let as_user = normalized(&a, IdentifierKind::UserId, "person7@example.org");
    let user = a.tokens(std::slice::from_ref(&as_user)).await?;
    assert_ne!(
        user[0], ta[7],
        "a user id spelled like an email is another identifier"
    );

    // Another deployment (another identifier key, another vault) has other tokens for the
    // same people: tokens are drawn at random, not computed.
    let other_db = TestDb::create().await?;
    cdp_keystore::store::migrator().run(&other_db.pool).await?;
    let other = random_key_args().vault(other_db.pool.clone())?;
    let theirs = other
        .tokens(&[normalized(
            &other,
            IdentifierKind::Email,
            "person7@example.org",
        )])
        .await?;
    assert_ne!(theirs[0], ta[7]);

    let unknown = normalized(&b, IdentifierKind::Email, "nobody@example.org");
    let before = rows(&db).await?;
    assert_eq!(b.find(std::slice::from_ref(&unknown)).await?, vec![None]);
    assert_eq!(rows(&db).await?, before, "find creates nothing");
    assert_eq!(
        b.find(&[plain[3].clone()]).await?,
        vec![Some(ta[3].clone())]
    );
    other_db.drop_db().await?;
    db.drop_db().await
}

/// An erasure (vault rows deleted, keys destroyed, in one transaction) reaches another
/// process's caches at its next epoch check: at once with a zero interval, and not before
/// the interval with a long one (the documented bound, `CDP_ERASURE_PROPAGATION_MS`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_erasure_empties_every_processs_caches_at_its_next_check() -> anyhow::Result<()> {
    let db = TestDb::create().await?;
    cdp_keystore::store::migrator().run(&db.pool).await?;
    let keys = random_key_args();
    let checking = |ms: u64| {
        let mut k = keys.clone();
        k.erasure_propagation_ms = ms;
        k
    };
    let eager_vault = checking(0).vault(db.pool.clone())?;
    let eager_keys = checking(0).key_store(db.pool.clone())?;
    let lazy_vault = checking(3_600_000).vault(db.pool.clone())?;
    let lazy_keys = checking(3_600_000).key_store(db.pool.clone())?;

    let ada = normalized(&eager_vault, IdentifierKind::Email, "ada@example.org");
    let grace = normalized(&eager_vault, IdentifierKind::Email, "grace@example.org");
    let tokens = eager_vault.tokens(&[ada.clone(), grace.clone()]).await?;
    let (ada_t, grace_t) = (tokens[0].clone(), tokens[1].clone());
    let subjects = [ada_t.as_str(), grace_t.as_str()];
    let created = eager_keys.current_keys(&subjects).await?;
    // Both processes cache both tokens and both keys.
    for v in [&eager_vault, &lazy_vault] {
        assert_eq!(v.find(&[ada.clone(), grace.clone()]).await?.len(), 2);
    }
    assert_eq!(lazy_keys.current_keys(&subjects).await?.len(), 2);
    let ada_v1 = (ada_t.clone(), created[&ada_t].version());
    assert!(lazy_keys.key(&ada_v1.0, ada_v1.1).await?.is_some());
    assert!(eager_keys.key(&ada_v1.0, ada_v1.1).await?.is_some());

    let mut tx = db.pool.begin().await?;
    assert_eq!(
        Vault::forget(&mut tx, std::slice::from_ref(&ada_t)).await?,
        1
    );
    assert_eq!(
        KeyStore::destroy(&mut tx, std::slice::from_ref(&ada_t)).await?,
        1
    );
    tx.commit().await?;

    assert_eq!(
        eager_vault.find(&[ada.clone(), grace.clone()]).await?,
        vec![None, Some(grace_t.clone())],
        "a zero interval sees the erasure at once"
    );
    assert!(eager_keys.key(&ada_v1.0, ada_v1.1).await?.is_none());
    assert!(eager_keys
        .key(&grace_t, created[&grace_t].version())
        .await?
        .is_some());
    assert_eq!(
        lazy_vault.find(std::slice::from_ref(&ada)).await?,
        vec![Some(ada_t.clone())],
        "within its interval a process may still use its cache"
    );
    assert!(lazy_keys.key(&ada_v1.0, ada_v1.1).await?.is_some());

    // The identifier seen again gets a new token: nothing links it to the erased one.
    let again = eager_vault.tokens(std::slice::from_ref(&ada)).await?;
    assert_ne!(again[0], ada_t);
    let (n,): (i64,) = sqlx::query_as("SELECT count(*) FROM identifier_vault WHERE token = $1")
        .bind(&ada_t)
        .fetch_one(&db.pool)
        .await?;
    assert_eq!(n, 0);
    db.drop_db().await
}
