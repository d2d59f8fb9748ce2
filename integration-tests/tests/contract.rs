//! The event contract against an independent Avro implementation (fastavro, in the stack's
//! venv): the same fingerprint for every released schema, our records decoded by it, and its
//! records decoded by us.

use std::io::Write;
use std::process::{Command, Stdio};

use anyhow::{ensure, Context};
use cdp_schemas::{decode_versioned, encode, fixtures, Contract};

/// Runs the fastavro script over the schema directory, with `input` lines on stdin.
fn fastavro(args: &[&str], input: &str) -> anyhow::Result<Vec<serde_json::Value>> {
    let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let mut child = Command::new(cdp_integration_tests::stack_python()?)
        .arg(dir.join("avro/fastavro_single_object.py"))
        .arg(dir.join("../schemas/avro"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting python")?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(input.as_bytes())?;
    let out = child.wait_with_output()?;
    ensure!(
        out.status.success(),
        "fastavro failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)?
        .lines()
        .map(|l| serde_json::from_str(l).context("a JSON line"))
        .collect()
}

#[test]
fn fastavro_computes_the_same_fingerprint_for_every_released_schema() -> anyhow::Result<()> {
    let theirs = fastavro(&["--fingerprints"], "")?;
    let mut ours = Vec::new();
    for set in cdp_schemas::all_schemas() {
        for v in set.versions() {
            ours.push(serde_json::json!({
                "schema": set.name,
                "version": v.version,
                "fingerprint": hex(&v.fingerprint.to_le_bytes()),
            }));
        }
    }
    let key = |v: &serde_json::Value| (v["schema"].to_string(), v["version"].to_string());
    let mut theirs = theirs;
    theirs.sort_by_key(key);
    ours.sort_by_key(key);
    ensure!(
        theirs == ours,
        "fingerprints differ:\nfastavro {theirs:#?}\nours {ours:#?}"
    );
    Ok(())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> anyhow::Result<Vec<u8>> {
    ensure!(s.len() % 2 == 0, "odd hex");
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).context("hex"))
        .collect()
}

/// Every sample of a family: fastavro finds its schema by fingerprint, decodes it, and
/// encodes it again; we decode fastavro's record back to the same event.
fn round_trip_through_fastavro<E: Contract + PartialEq + std::fmt::Debug>(
    samples: Vec<E>,
) -> anyhow::Result<()> {
    let encoded: Vec<Vec<u8>> = samples.iter().map(encode).collect::<Result<_, _>>()?;
    let input: String = encoded.iter().map(|b| hex(b) + "\n").collect();
    let lines = fastavro(&[], &input)?;
    ensure!(
        lines.len() == samples.len(),
        "one line per record: {lines:?}"
    );
    let current = E::schema_set().current();
    for ((event, ours), line) in samples.iter().zip(&encoded).zip(&lines) {
        ensure!(
            line["schema"] == E::SCHEMA && line["version"] == current.version,
            "{}: fastavro did not find the writer schema by its fingerprint: {line}",
            E::SCHEMA
        );
        ensure!(
            line["fields"] == serde_json::json!(["envelope", "payload"]),
            "fastavro decoded {line}"
        );
        let theirs = unhex(line["reencoded"].as_str().context("reencoded")?)?;
        ensure!(
            &theirs == ours,
            "{} {}: fastavro's single-object bytes differ from ours",
            E::SCHEMA,
            event.event_type()
        );
        let (back, version) = decode_versioned::<E>(&theirs)?;
        ensure!(
            version == current.version && &back == event,
            "decoded {back:?}"
        );
    }
    Ok(())
}

#[test]
fn fastavro_decodes_our_records_and_we_decode_its_records() -> anyhow::Result<()> {
    round_trip_through_fastavro(fixtures::customer_events())?;
    round_trip_through_fastavro(fixtures::capsule_events())?;
    round_trip_through_fastavro(fixtures::compliance_events())?;
    round_trip_through_fastavro(fixtures::identity_events())?;
    round_trip_through_fastavro(fixtures::profile_events())?;
    Ok(())
}
