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
