//! Logs and metrics never carry personal data. The pipeline (ingest, identity, the projector,
//! the archiver, the profile API and the erasure processor) runs in this process with every
//! log at debug level captured; a person's events go in through the HTTP API (an invalid one
//! too), are resolved, projected, archived, looked up and erased. Then every log line and
//! every metric is searched for the plaintext identifiers and traits that were sent.
//!
//! Its own test binary: the log subscriber is global to the process.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cdp_erasure::Request;
use cdp_integration_tests::archive::{archived_count, local_store};
use cdp_integration_tests::ingest::{Ingest, Options};
use cdp_integration_tests::{pipeline, require_broker, wait_until};
use cdp_keystore::RawIdentifier;
use cdp_runtime::metrics::Metrics;
use cdp_runtime::topics::Topic;
use cdp_schemas::IdentifierKind;
use serde_json::json;

const WAIT: Duration = Duration::from_secs(120);

/// Everything written to the log, in memory.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap_or_else(|p| p.into_inner())).into_owned()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_personal_data_reaches_a_log_line_or_a_metric() -> anyhow::Result<()> {
    let log = Captured::default();
    let writer = log.clone();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("debug"))
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .try_init()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    require_broker().await?;

    // Every value sent carries this run's mark, so a find is this test's data and nothing else.
    let mark = format!("{:012x}", rand::random::<u64>() & 0xffff_ffff_ffff);
    let line = 1000 + rand::random::<u16>() % 9000;
    let email = format!("canary.{mark}@example.org");
    let phone = format!("+1 415 555 {line}");
    let user = format!("canary-user-{mark}");
    let anon = format!("canary-anon-{mark}");
    let personal: Vec<String> = vec![
        mark.clone(),
        email.to_uppercase(),
        format!("415555{line}"),
        format!("(415) 555-{line}"),
        format!("555 {line}"),
    ];

    let ing = Ingest::start_with(Options {
        erasure_propagation_ms: 0,
        ..Options::default()
    })
    .await?;
    let metrics = Metrics::new();
    let ic =
        cdp_integration_tests::identity::identity_for(&ing.kafka, &ing.db, &ing.key_args, "id_pii");
    cdp_integration_tests::identity::create_graph(&ic).await?;
    let pc = pipeline::projector(&ing, "pii");
    let ec = pipeline::erasure(&ing, "erasure_pii", "id_pii");
    let (store, dir) = local_store();
    let ac = pipeline::archiver(&ing, store.clone());
    let services = vec![
        {
            let ic = ic.clone();
            pipeline::spawn(&metrics, |m, r, s| async move {
                cdp_identity::run(ic, &m, &r, s)
                    .await
                    .map_err(anyhow::Error::from)
            })
        },
        {
            let pc = pc.clone();
            pipeline::spawn(&metrics, |m, r, s| async move {
                cdp_projector::run(pc, &m, &r, s)
                    .await
                    .map_err(anyhow::Error::from)
            })
        },
        {
            let ec = ec.clone();
            pipeline::spawn(&metrics, |m, r, s| async move {
                cdp_erasure::run(ec, &m, &r, s)
                    .await
                    .map_err(anyhow::Error::from)
            })
        },
        pipeline::spawn(&metrics, |m, r, s| async move {
            cdp_archiver::run(ac, &m, &r, s)
                .await
                .map_err(anyhow::Error::from)
        }),
    ];

    let batch = json!({"batch": [
        {"type": "page", "anonymousId": anon, "name": format!("Pricing {mark}"),
         "properties": {"title": format!("Plans for {mark}"), "url": format!("https://shop.example/{mark}")},
         "messageId": "p1"},
        {"type": "identify", "anonymousId": anon, "userId": user,
         "traits": {"email": email, "phone": phone, "firstName": format!("Canary{mark}"),
                    "lastName": format!("Bird{mark}"),
                    "address": {"street": format!("{mark} Canary Lane"), "city": "Springfield"}},
         "messageId": "p2"},
        {"type": "track", "userId": user, "event": "Order Completed", "messageId": "p3",
         "properties": {"order_id": format!("order-{mark}"), "total": 42.5, "currency": "EUR",
                        "coupon": format!("COUPON-{mark}"),
                        "products": [{"product_id": "sku-1", "name": format!("Gift for {mark}"),
                                      "quantity": 1, "price": 42.5}]}},
        {"type": "alias", "previousId": format!("old-{mark}"), "userId": user, "messageId": "p4"},
        // Refused: an invalid email. Its value goes nowhere but the rejection log's table.
        {"type": "identify", "userId": user, "traits": {"email": format!("broken.{mark}@")},
         "messageId": "p5"},
    ]});
    let (status, body) = ing.post("/v1/batch", &batch).await?;
    anyhow::ensure!(status == 200 && body["accepted"] == 4, "{body}");

    let pool = ing.db.pool.clone();
    cdp_integration_tests::identity::caught_up(&pool, &ic, &ing.topic(Topic::CustomerEvents), WAIT)
        .await?;
    cdp_integration_tests::projector::caught_up(&pool, &pc, WAIT, Duration::from_millis(100))
        .await?;
    let archive = cdp_archiver::Archive::open(&store)?;
    let events = ing.topic(Topic::CustomerEvents);
    wait_until("the events archived", WAIT, || async {
        Ok(archived_count(&archive, &events).await? >= 4)
    })
    .await?;

    // The profile API: a lookup by email, and a failed one.
    let api_stop = cdp_runtime::Shutdown::new();
    let (api_addr, api_serve) = cdp_projector::bind_api(
        &ing.db.args(),
        &ing.key_args,
        "p_pii",
        &cdp_projector::ApiArgs {
            api_addr: "127.0.0.1:0".parse()?,
            api_tokens: vec!["support:read:r-secret".to_owned()],
        },
        api_stop.clone(),
    )
    .await?;
    let api = tokio::spawn(api_serve);
    let lookup = |email: String| {
        let url = format!(
            "http://{api_addr}/v1/profiles?email={}",
            email.replace('@', "%40")
        );
        async move {
            anyhow::Ok(
                reqwest::Client::new()
                    .get(url)
                    .bearer_auth("r-secret")
                    .send()
                    .await?
                    .status()
                    .as_u16(),
            )
        }
    };
    anyhow::ensure!(lookup(email.clone()).await? == 200);
    anyhow::ensure!(lookup(format!("nobody.{mark}@example.org")).await? == 404);

    // The person is erased by phone.
    let requests = cdp_erasure::Requests::open(&ec).await?;
    let id = requests
        .file(&Request {
            identifiers: vec![RawIdentifier::new(IdentifierKind::Phone, &phone)],
            profiles: Vec::new(),
            requested_by: "dpo@example.org".to_owned(),
            reason: Some("Art. 17".to_owned()),
            suppress: true,
            force: false,
        })
        .await?;
    let done = requests
        .wait_final(id, WAIT)
        .await?
        .ok_or_else(|| anyhow::anyhow!("the erasure did not complete"))?;
    anyhow::ensure!(done.state == "completed", "{done:?}");
    anyhow::ensure!(lookup(email.clone()).await? == 404);

    api_stop.trigger();
    api.await??;
    for (stop, task) in services {
        stop.trigger();
        task.await??;
    }
    let metrics_text = [metrics.encode()?, ing.metrics.encode()?].join("\n");
    ing.stop().await?;
    let _ = std::fs::remove_dir_all(dir);

    let logged = log.text();
    // The capture saw the pipeline at work, debug lines included: a search of nothing proves
    // nothing.
    let lines = logged.lines().count();
    anyhow::ensure!(
        lines > 200 && logged.contains("DEBUG") && logged.contains("batch committed"),
        "only {lines} log lines captured"
    );
    let lowered = (logged.to_lowercase(), metrics_text.to_lowercase());
    for value in &personal {
        let v = value.to_lowercase();
        if let Some(at) = lowered.0.find(&v) {
            let start = lowered.0[..at].rfind('\n').map_or(0, |i| i + 1);
            let end = lowered.0[at..]
                .find('\n')
                .map_or(lowered.0.len(), |i| at + i);
            anyhow::bail!("{value:?} in a log line: {}", &logged[start..end]);
        }
        anyhow::ensure!(!lowered.1.contains(&v), "{value:?} in the metrics");
    }
    Ok(())
}
