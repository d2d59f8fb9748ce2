//! Contract tests: round trips, golden bytes, compatibility with every released version,
//! robustness against corrupt input, and agreement between schemas, code and docs.

use std::path::{Path, PathBuf};

use apache_avro::schema_compatibility::{Compatibility, SchemaCompatibility};
use apache_avro::{GenericSingleObjectWriter, Schema};
use cdp_schemas::registry::SchemaSet;
use cdp_schemas::{
    catalog, decode, decode_versioned, encode, fixtures, CapsuleEvent, CodecError, ComplianceEvent,
    Contract, CustomerEvent, IdentityEvent,
};

fn crate_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn golden_path(schema: &str, version: i32) -> PathBuf {
    crate_dir()
        .join("tests/golden")
        .join(schema)
        .join(format!("v{version}.hex"))
}

/// The same datums as [`golden_path`]'s, framed with the legacy fingerprint of their version
/// (as records written before the specification's fingerprints were adopted carry it).
fn legacy_golden_path(schema: &str, version: i32) -> PathBuf {
    crate_dir()
        .join("tests/golden")
        .join(schema)
        .join(format!("v{version}-legacy-fingerprint.hex"))
}

/// Golden lines: `<event_type> <hex of the framed record>`.
fn read_golden(path: &Path) -> Vec<(String, Vec<u8>)> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let (ty, hex) = l
                .split_once(' ')
                .unwrap_or_else(|| panic!("bad golden line {l}"));
            (
                ty.to_owned(),
                hex::decode(hex.trim()).unwrap_or_else(|e| panic!("bad hex: {e}")),
            )
        })
        .collect()
}

fn check_family<E: Contract + PartialEq + std::fmt::Debug>(samples: Vec<E>) {
    let set = E::schema_set();
    // Round trip of every event type, and every payload branch is covered by a sample.
    let mut types: Vec<&str> = samples.iter().map(|e| e.event_type()).collect();
    types.dedup();
    assert_eq!(
        types.len(),
        samples.len(),
        "{}: one sample per event type",
        E::SCHEMA
    );
    let encoded: Vec<Vec<u8>> = samples.iter().map(|e| encode(e).expect("encode")).collect();
    for (event, bytes) in samples.iter().zip(&encoded) {
        let (back, version) = decode_versioned::<E>(bytes).expect("decode");
        assert_eq!(&back, event);
        assert_eq!(version, set.current().version);
    }

    // Golden bytes of the current version: an accidental change of encoding fails here.
    let path = golden_path(E::SCHEMA, set.current().version);
    let rendered: String = samples
        .iter()
        .zip(&encoded)
        .map(|(e, b)| format!("{} {}\n", e.event_type(), hex::encode(b)))
        .collect();
    if std::env::var_os("CDP_UPDATE_GOLDEN").is_some() && !path.exists() {
        std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        std::fs::write(&path, &rendered).expect("write golden");
    }
    let golden = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e}. A new schema version needs its golden file: run the tests once with CDP_UPDATE_GOLDEN=1",
            path.display()
        )
    });
    assert_eq!(
        golden,
        rendered,
        "{}: encoding changed for a released version",
        E::SCHEMA
    );

    // Every released version's data is readable by the current code, under the
    // specification's fingerprint and under the legacy one.
    for v in set.versions() {
        let lines = read_golden(&golden_path(E::SCHEMA, v.version));
        // Versions released after the specification's fingerprints have no legacy data.
        let legacy_path = legacy_golden_path(E::SCHEMA, v.version);
        let legacy = if legacy_path.exists() {
            read_golden(&legacy_path)
        } else {
            Vec::new()
        };
        assert!(!lines.is_empty());
        assert!(legacy.is_empty() || lines.len() == legacy.len());
        for ((_, bytes), (_, old)) in lines.iter().zip(&legacy) {
            assert_eq!(bytes[2..10], v.fingerprint.to_le_bytes());
            assert_eq!(old[2..10], v.legacy_fingerprint.to_le_bytes());
            assert_eq!(
                bytes[10..],
                old[10..],
                "the same datum under both fingerprints"
            );
        }
        for (ty, bytes) in lines.into_iter().chain(legacy) {
            let (event, written_with) = decode_versioned::<E>(&bytes)
                .unwrap_or_else(|e| panic!("{} v{} {ty}: {e}", E::SCHEMA, v.version));
            assert_eq!(written_with, v.version);
            assert_eq!(event.event_type(), ty);
            if v.version == set.current().version {
                assert!(samples.contains(&event));
            }
        }
        // Full: every datum the old version can write resolves (Partial would mean some
        // union branch or enum symbol of the old version cannot be read).
        let compat = SchemaCompatibility::can_read(v.schema, set.current().schema);
        assert!(
            matches!(compat, Ok(Compatibility::Full)),
            "{} v{} is not fully readable by the current schema: {compat:?}",
            E::SCHEMA,
            v.version
        );
    }

    // Corrupt input gives typed errors, never a panic.
    for bytes in &encoded {
        for cut in 0..bytes.len() {
            let _ = decode::<E>(&bytes[..cut]);
        }
        for i in 0..bytes.len() {
            for bit in [0x01u8, 0x80, 0xff] {
                let mut b = bytes.clone();
                b[i] ^= bit;
                let _ = decode::<E>(&b);
            }
        }
        let mut extra = bytes.clone();
        extra.push(0);
        assert!(matches!(
            decode::<E>(&extra),
            Err(CodecError::TrailingBytes { trailing: 1, .. })
        ));
    }
}

#[test]
fn customer_events_round_trip_and_stay_compatible() {
    check_family::<CustomerEvent>(fixtures::customer_events());
}

#[test]
fn capsule_events_round_trip_and_stay_compatible() {
    check_family::<CapsuleEvent>(fixtures::capsule_events());
}

#[test]
fn compliance_events_round_trip_and_stay_compatible() {
    check_family::<ComplianceEvent>(fixtures::compliance_events());
}

#[test]
fn identity_events_round_trip_and_stay_compatible() {
    check_family::<IdentityEvent>(fixtures::identity_events());
}

#[test]
fn profile_events_round_trip_and_stay_compatible() {
    check_family::<cdp_schemas::ProfileEvent>(fixtures::profile_events());
}

#[test]
fn audit_events_round_trip_and_stay_compatible() {
    check_family::<cdp_schemas::AuditEvent>(fixtures::audit_events());
}

#[test]
fn typed_errors_for_bad_frames() {
    assert!(matches!(
        decode::<CustomerEvent>(&[]),
        Err(CodecError::Empty)
    ));
    assert!(matches!(
        decode::<CustomerEvent>(&[0xc3, 0x01, 0]),
        Err(CodecError::TooShort(3))
    ));
    assert!(matches!(
        decode::<CustomerEvent>(b"{\"json\": true}"),
        Err(CodecError::BadMagic(_))
    ));
    let mut unknown = vec![0xc3, 0x01];
    unknown.extend_from_slice(&0xdead_beef_u64.to_le_bytes());
    unknown.extend_from_slice(&[0; 32]);
    assert!(matches!(
        decode::<CustomerEvent>(&unknown),
        Err(CodecError::UnknownFingerprint {
            fingerprint: 0xdead_beef,
            ..
        })
    ));
    // A capsule event is not a customer event: its fingerprint is unknown to that schema.
    let capsule = encode(&fixtures::capsule_events()[0]).expect("encode");
    assert!(matches!(
        decode::<CustomerEvent>(&capsule),
        Err(CodecError::UnknownFingerprint { .. })
    ));
    // Random garbage after a valid header.
    let header = &encode(&fixtures::customer_events()[0]).expect("encode")[..10];
    for seed in 0..2_000u64 {
        let mut b = header.to_vec();
        let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        for _ in 0..(seed % 97) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            b.push(x as u8);
        }
        let _ = decode::<CustomerEvent>(&b);
    }
}

#[test]
fn framing_is_standard_single_object_encoding() {
    for event in fixtures::customer_events() {
        let ours = encode(&event).expect("encode");
        let set = CustomerEvent::schema_set();
        let mut writer = GenericSingleObjectWriter::new_with_capacity(set.current().schema, 512)
            .expect("writer");
        let mut theirs = Vec::new();
        writer
            .write_value_ref(&event.to_value(set.current().version), &mut theirs)
            .expect("apache-avro single-object writer");
        // The marker and the datum are apache-avro's; the fingerprint is the specification's
        // (apache-avro's is the legacy alias). integration-tests/tests/contract.rs checks both
        // against fastavro.
        assert_eq!(ours[..2], theirs[..2]);
        assert_eq!(ours[2..10], set.current().fingerprint.to_le_bytes());
        assert_eq!(
            theirs[2..10],
            set.current().legacy_fingerprint.to_le_bytes()
        );
        assert_eq!(ours[10..], theirs[10..]);
    }
}

/// The specification's fingerprint of every released version, as fastavro 1.12.1
/// (`fastavro.schema.fingerprint(to_parsing_canonical_form(s), "CRC-64-AVRO")`, read as a
/// little-endian u64) computes it from the `.avsc` file. The integration test
/// `contract::fastavro_agrees_on_fingerprints_and_bytes` computes them live.
#[test]
fn fingerprints_are_the_specifications() {
    let expected: &[(&str, i32, u64)] = &[
        ("customer-event", 1, 0x105f_68ad_b988_1eba),
        ("customer-event", 2, 0x830c_2a9a_d56a_b304),
        ("customer-event", 3, 0x0ecc_650d_208d_6d73),
        ("capsule-event", 1, 0x060e_e70b_1b39_b990),
        ("capsule-event", 2, 0xd8d4_6e14_5898_c044),
        ("capsule-event", 3, 0x8daf_a136_1402_5e62),
        ("compliance-event", 1, 0x91ec_15a2_2f0c_2fa8),
        ("compliance-event", 2, 0x53df_d34f_bcc3_56a5),
        ("compliance-event", 3, 0x7d8e_eddc_a295_bc4e),
        ("identity-event", 1, 0x3ca9_e8ae_4d83_5bbc),
        ("identity-event", 2, 0x763a_c312_5fcc_8184),
        ("identity-event", 3, 0x574d_510a_912b_e2af),
        ("profile-event", 1, 0x4c1e_82cb_e547_c256),
        ("profile-event", 2, 0xc3ab_ef07_f0ae_d6e5),
        ("audit-event", 1, 0x242d_0114_b375_9247),
    ];
    let mut found = Vec::new();
    for set in cdp_schemas::all_schemas() {
        for v in set.versions() {
            found.push((set.name, v.version, v.fingerprint));
            assert_ne!(v.fingerprint, v.legacy_fingerprint);
            assert_eq!(
                set.by_fingerprint(v.legacy_fingerprint).map(|x| x.version),
                Some(v.version)
            );
            assert_eq!(
                set.by_fingerprint(v.fingerprint).map(|x| x.version),
                Some(v.version)
            );
        }
    }
    assert_eq!(found, expected);
}

#[test]
fn every_history_file_is_registered_and_the_current_schema_is_released() {
    for set in cdp_schemas::all_schemas() {
        let dir = crate_dir().join("avro/history").join(set.name);
        let files = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .count();
        let released = set.versions().iter().filter(|v| {
            let p = dir.join(format!("v{}.avsc", v.version));
            std::fs::read_to_string(p)
                .map(|s| s == v.source)
                .unwrap_or(false)
        });
        assert_eq!(
            released.count(),
            set.versions().len(),
            "{}: the current schema differs from every released version; copy it to {}/v{}.avsc and register it",
            set.name,
            dir.display(),
            set.current().version
        );
        assert_eq!(
            files,
            set.versions().len(),
            "{}: a history file is not registered in model/mod.rs",
            set.name
        );
    }
}

fn avsc(name: &str) -> serde_json::Value {
    let path = crate_dir().join("avro").join(format!("{name}.avsc"));
    serde_json::from_str(&std::fs::read_to_string(path).expect("read avsc")).expect("json")
}

#[test]
fn the_envelope_is_identical_in_every_schema() {
    let envelopes: Vec<serde_json::Value> = [
        "customer-event",
        "capsule-event",
        "compliance-event",
        "identity-event",
    ]
    .iter()
    .map(|n| avsc(n)["fields"][0].clone())
    .collect();
    for e in &envelopes {
        assert_eq!(e["name"], "envelope");
        assert_eq!(e, &envelopes[0]);
    }
}

#[test]
fn pii_fields_are_sealed_bytes_and_only_those() {
    fn walk(t: &serde_json::Value, found: &mut Vec<String>) {
        if let Some(fields) = t.get("fields").and_then(|f| f.as_array()) {
            for f in fields {
                let is_pii = f.get("pii").and_then(|p| p.as_bool()) == Some(true);
                let sealed_shape = f["type"] == serde_json::json!(["null", "bytes"]);
                assert_eq!(is_pii, sealed_shape, "field {} of {}", f["name"], t["name"]);
                if is_pii {
                    found.push(format!(
                        "{}.{}",
                        t["name"].as_str().unwrap_or(""),
                        f["name"].as_str().unwrap_or("")
                    ));
                }
                walk(&f["type"], found);
            }
        }
        if let Some(branches) = t.as_array() {
            branches.iter().for_each(|b| walk(b, found));
        }
        for key in ["type", "items", "values"] {
            if let Some(inner) = t.get(key).filter(|v| v.is_object() || v.is_array()) {
                walk(inner, found);
            }
        }
    }
    for set in cdp_schemas::all_schemas() {
        let mut found = Vec::new();
        walk(&avsc(set.name), &mut found);
        found.sort();
        found.dedup();
        let listed: Vec<String> = catalog::pii_fields(set)
            .iter()
            .map(|p| format!("{}.{}", p.record, p.field))
            .collect();
        assert_eq!(found, listed, "{}", set.name);
    }
    let customer = catalog::pii_fields(CustomerEvent::schema_set());
    assert!(customer
        .iter()
        .any(|p| p.record == "Identify" && p.field == "email"));
}

#[test]
fn an_incompatible_change_is_caught() {
    let current = CustomerEvent::schema_set().current().source;
    // Adding a required field without a default to Track breaks reading old data.
    let mut json: serde_json::Value = serde_json::from_str(current).expect("json");
    let track = &mut json["fields"][1]["type"][1]["fields"];
    track
        .as_array_mut()
        .expect("fields")
        .push(serde_json::json!({"name": "required_new", "type": "string"}));
    let next = Schema::parse_str(&json.to_string()).expect("parse");
    let verdict =
        SchemaCompatibility::can_read(CustomerEvent::schema_set().current().schema, &next);
    assert!(
        !matches!(verdict, Ok(Compatibility::Full)),
        "a new field without default must be refused: {verdict:?}"
    );
    // With a default it is a compatible evolution.
    let track = &mut json["fields"][1]["type"][1]["fields"];
    if let Some(last) = track.as_array_mut().and_then(|a| a.last_mut()) {
        *last = serde_json::json!({"name": "optional_new", "type": ["null", "string"], "default": null});
    }
    let next = Schema::parse_str(&json.to_string()).expect("parse");
    assert!(matches!(
        SchemaCompatibility::can_read(CustomerEvent::schema_set().current().schema, &next),
        Ok(Compatibility::Full)
    ));
}

#[test]
fn the_event_catalogue_is_up_to_date() {
    let set: Vec<&SchemaSet> = cdp_schemas::all_schemas().to_vec();
    let rendered = catalog::markdown(&set);
    let path = crate_dir().join("../docs/events.md");
    if std::env::var_os("CDP_UPDATE_DOCS").is_some() {
        std::fs::write(&path, &rendered).expect("write docs/events.md");
    }
    let on_disk = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        on_disk == rendered,
        "docs/events.md is stale: run `cdp schemas catalog > docs/events.md` (or the tests with CDP_UPDATE_DOCS=1)"
    );
}

#[test]
fn the_pii_visitor_matches_the_schema_marks() {
    let marked: Vec<(String, String)> = cdp_schemas::all_schemas()
        .iter()
        .flat_map(|s| catalog::pii_fields(s))
        .map(|p| (p.record, p.field))
        .collect();
    let mut visited: Vec<(String, String)> = Vec::new();
    for mut e in fixtures::customer_events() {
        let record = e.payload.record_name();
        let read_only: Vec<&str> = e.payload.pii().into_iter().map(|(f, _)| f).collect();
        let writable: Vec<&str> = e.payload.pii_mut().into_iter().map(|(f, _)| f).collect();
        assert_eq!(read_only, writable, "pii and pii_mut list the same fields");
        visited.extend(
            e.pii_mut()
                .into_iter()
                .map(|(f, _)| (record.to_owned(), f.to_owned())),
        );
    }
    for mut e in fixtures::capsule_events() {
        let record = e.payload.record_name();
        let read_only: Vec<&str> = e.payload.pii().into_iter().map(|(f, _)| f).collect();
        let writable: Vec<&str> = e.payload.pii_mut().into_iter().map(|(f, _)| f).collect();
        assert_eq!(read_only, writable, "pii and pii_mut list the same fields");
        visited.extend(
            e.pii_mut()
                .into_iter()
                .map(|(f, _)| (record.to_owned(), f.to_owned())),
        );
    }
    for mut e in fixtures::compliance_events() {
        assert!(e.pii_mut().is_empty());
    }
    for mut e in fixtures::identity_events() {
        assert!(e.pii_mut().is_empty());
    }
    for mut e in fixtures::profile_events() {
        let n = e.pii_mut().len();
        assert_eq!(n, 2, "one sealed slot per trait");
        visited.push(("TraitValue".to_owned(), "sealed".to_owned()));
    }
    for mut e in fixtures::audit_events() {
        visited.extend(
            e.pii_mut()
                .into_iter()
                .map(|(f, _)| ("ErasureAudited".to_owned(), f.to_owned())),
        );
    }
    visited.sort();
    let mut marked = marked;
    marked.sort();
    assert_eq!(visited, marked);
}
