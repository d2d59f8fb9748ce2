//! The identifier vault and the key store's cache invalidation, against the real Postgres.

use std::collections::HashSet;

use cdp_integration_tests::{random_key_args, TestDb};
use cdp_keystore::{Normalized, RawIdentifier, Vault};
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
    let done = cdp_keystore::erasure::shred(
        &mut tx,
        &keys.suppression_key()?,
        &cdp_keystore::erasure::Shred {
            tokens: std::slice::from_ref(&ada_t),
            named: &[],
            suppress: false,
            profiles: &[],
        },
    )
    .await?;
    assert_eq!(done.vault_rows, 1);
    assert_eq!(done.keys_destroyed, 1);
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

async fn count(db: &TestDb, sql: &str) -> anyhow::Result<i64> {
    Ok(sqlx::query_scalar(sql).fetch_one(&db.pool).await?)
}

/// Shredding a person: suppression entries for their identifiers (also one the vault never
/// saw), their tokens in the ledger, their keys destroyed, their vault rows gone, in one
/// transaction. Afterwards the vault refuses their identifiers, the key store gives their
/// subject no key, nothing in the registry leads to a token, and shredding again changes
/// nothing; after unsuppressing, the same email is a new, unrelated person. Without
/// suppression, a person comes back at once as a new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shredding_makes_a_person_unlinkable_and_keeps_them_out() -> anyhow::Result<()> {
    use cdp_keystore::erasure::{erased, shred, unsuppress, Shred, Shredded};
    let db = TestDb::create().await?;
    cdp_keystore::store::migrator().run(&db.pool).await?;
    let keys = random_key_args();
    let vault = keys.vault(db.pool.clone())?;
    let store = keys.key_store(db.pool.clone())?;
    let sk = keys.suppression_key()?;
    let n = |k, v: &str| normalized(&vault, k, v);
    let (ada_mail, ada_user, ada_phone, grace) = (
        n(IdentifierKind::Email, "ada@example.org"),
        n(IdentifierKind::UserId, "ada"),
        n(IdentifierKind::Phone, "+442071234567"),
        n(IdentifierKind::Email, "grace@example.org"),
    );
    let t = vault
        .tokens(&[ada_mail.clone(), ada_user.clone(), grace.clone()])
        .await?;
    let (mail_t, user_t, grace_t) = (t[0].clone(), t[1].clone(), t[2].clone());
    let created = store
        .current_keys(&[user_t.as_str(), grace_t.as_str()])
        .await?;
    let ada_key = (user_t.clone(), created[&user_t].version());

    let cluster = [mail_t.clone(), user_t.clone()];
    // The phone was never seen: named by the request, it is suppressed all the same.
    let named = [vault.hasher().digest(&ada_phone)];
    let what = Shred {
        tokens: &cluster,
        named: &named,
        suppress: true,
        profiles: &[],
    };
    let mut tx = db.pool.begin().await?;
    let done = shred(&mut tx, &sk, &what).await?;
    tx.commit().await?;
    assert_eq!(
        done,
        Shredded {
            vault_rows: 2,
            keys_destroyed: 1,
            suppressed: 3,
            ledgered: 2
        }
    );

    // Unreadable and unlinkable: no vault row, no key, and no key again. (Another process,
    // checking the epoch at every use, so that later erasures reach it at once.)
    let mut eager = keys.clone();
    eager.erasure_propagation_ms = 0;
    let fresh = eager.vault(db.pool.clone())?;
    assert_eq!(
        fresh
            .find(&[ada_mail.clone(), ada_user.clone(), grace.clone()])
            .await?,
        vec![None, None, Some(grace_t.clone())]
    );
    let fresh_store = keys.key_store(db.pool.clone())?;
    assert!(fresh_store.key(&ada_key.0, ada_key.1).await?.is_none());
    assert!(
        !fresh_store
            .current_keys(&[user_t.as_str()])
            .await?
            .contains_key(&user_t),
        "an erased subject never gets a key again"
    );
    // Kept out: the vault makes no token for any of the three identifiers.
    assert_eq!(
        fresh
            .tokens_unless_suppressed(&[ada_mail.clone(), grace.clone(), ada_phone.clone()])
            .await?,
        vec![None, Some(grace_t.clone()), None]
    );
    assert!(matches!(
        fresh.tokens(std::slice::from_ref(&ada_user)).await,
        Err(cdp_keystore::VaultError::Suppressed(0))
    ));
    // The ledger names the tokens; the registry holds entries, nothing else (not even the
    // request: from it the compliance topic would lead to the tokens).
    let mut conn = db.pool.acquire().await?;
    let ledger = erased(&mut conn, &[mail_t.as_str(), grace_t.as_str()]).await?;
    assert!(ledger.contains(&mail_t) && !ledger.contains(&grace_t));
    drop(conn);
    let columns: Vec<String> = sqlx::query_scalar(
        "SELECT column_name::text FROM information_schema.columns
          WHERE table_name = 'suppressions' ORDER BY ordinal_position",
    )
    .fetch_all(&db.pool)
    .await?;
    assert_eq!(columns, ["entry"]);
    let digests_there = count(
        &db,
        "SELECT count(*) FROM suppressions s JOIN identifier_vault v ON v.digest = s.entry",
    )
    .await?;
    assert_eq!(digests_there, 0, "an entry is not a vault digest");

    // Again: nothing left to do.
    let mut tx = db.pool.begin().await?;
    assert_eq!(shred(&mut tx, &sk, &what).await?, Shredded::default());
    tx.commit().await?;

    // Unsuppressed, the email starts a new person, linked to nothing erased.
    let mut tx = db.pool.begin().await?;
    assert_eq!(
        unsuppress(&mut tx, &sk, &[vault.hasher().digest(&ada_mail)]).await?,
        1
    );
    tx.commit().await?;
    let again = fresh.tokens(std::slice::from_ref(&ada_mail)).await?;
    assert_ne!(again[0], mail_t);

    // Without suppression (DELETE_ONLY), Grace may come back at once, as someone new.
    let mut tx = db.pool.begin().await?;
    let gone = shred(
        &mut tx,
        &sk,
        &Shred {
            tokens: std::slice::from_ref(&grace_t),
            named: &[],
            suppress: false,
            profiles: &[],
        },
    )
    .await?;
    tx.commit().await?;
    assert_eq!((gone.vault_rows, gone.suppressed), (1, 0));
    let back = fresh.tokens(std::slice::from_ref(&grace)).await?;
    assert_ne!(back[0], grace_t);
    db.drop_db().await
}

/// Token creation racing an erasure of the same identifier: whoever wins, no token of a
/// suppressed identifier survives the erasure, and every token handed out is either the
/// erased one (in the ledger) or none at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_created_while_its_identifier_is_erased_does_not_survive() -> anyhow::Result<()> {
    use cdp_keystore::erasure::{erased, shred, Shred};
    let db = TestDb::create().await?;
    cdp_keystore::store::migrator().run(&db.pool).await?;
    let keys = random_key_args();
    let sk = keys.suppression_key()?;
    for round in 0..40 {
        // A new identifier each round, named by the request before any event carried it.
        let creator = keys.vault(db.pool.clone())?;
        let id = normalized(
            &creator,
            IdentifierKind::Email,
            &format!("late{round}@example.org"),
        );
        let named = [creator.hasher().digest(&id)];
        let erase = async {
            let mut tx = db.pool.begin().await?;
            shred(
                &mut tx,
                &sk,
                &Shred {
                    tokens: &[],
                    named: &named,
                    suppress: true,
                    profiles: &[],
                },
            )
            .await?;
            tx.commit().await?;
            anyhow::Ok(())
        };
        let (created, erased_ok) = tokio::join!(
            creator.tokens_unless_suppressed(std::slice::from_ref(&id)),
            erase
        );
        erased_ok?;
        let left = count(&db, "SELECT count(*) FROM identifier_vault").await?;
        assert_eq!(left, 0, "round {round}: no token survives the erasure");
        if let Some(token) = created?.pop().flatten() {
            let mut conn = db.pool.acquire().await?;
            assert!(
                erased(&mut conn, &[token.as_str()]).await?.contains(&token),
                "round {round}: a token handed out before the erasure is in the ledger"
            );
        }
    }
    db.drop_db().await
}
