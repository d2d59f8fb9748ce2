//! The event catalogue (`docs/events.md`), rendered from the `.avsc` files, and the list
//! of PII fields the schemas mark with `"pii": true`.

use serde_json::Value as Json;

use crate::registry::SchemaSet;

/// Which topic carries each schema (documentation only; topic names live in the runtime's
/// catalogue).
const TOPICS: &[(&str, &str)] = &[
    (
        "customer-event",
        "`cdp.customer-events`, keyed by subject id",
    ),
    ("capsule-event", "`cdp.capsule-events`, keyed by capsule id"),
    ("compliance-event", "`cdp.compliance`, keyed by request id"),
    ("audit-event", "`cdp.audit`, keyed by request id"),
    (
        "identity-event",
        "`cdp.identity` (compacted), keyed by the link id (`IdentifiersLinked`), the loser's profile id (`ProfilesMerged`) or the new profile id (`ProfileSplit`)",
    ),
];

/// A PII field: `Record.field` path as it appears in the schema.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct PiiField {
    pub record: String,
    pub field: String,
}

fn parse(set: &SchemaSet) -> Json {
    serde_json::from_str(set.current().source).unwrap_or(Json::Null)
}

fn type_name(t: &Json) -> String {
    match t {
        Json::String(s) => s.clone(),
        Json::Array(branches) => {
            let names: Vec<String> = branches.iter().map(type_name).collect();
            if names.len() == 2 && names[0] == "null" {
                format!("{}?", names[1])
            } else {
                names.join(" \\| ")
            }
        }
        Json::Object(o) => {
            let ty = o.get("type").and_then(Json::as_str).unwrap_or("?");
            if let Some(logical) = o.get("logicalType").and_then(Json::as_str) {
                return match logical {
                    "decimal" => format!(
                        "decimal({}, {})",
                        o.get("precision").and_then(Json::as_u64).unwrap_or(0),
                        o.get("scale").and_then(Json::as_u64).unwrap_or(0)
                    ),
                    other => other.to_owned(),
                };
            }
            match ty {
                "record" | "enum" => o
                    .get("name")
                    .and_then(Json::as_str)
                    .unwrap_or("?")
                    .to_owned(),
                "array" => format!(
                    "array<{}>",
                    o.get("items").map(type_name).unwrap_or_default()
                ),
                "map" => format!(
                    "map<{}>",
                    o.get("values").map(type_name).unwrap_or_default()
                ),
                other => other.to_owned(),
            }
        }
        _ => "?".to_owned(),
    }
}

/// Every named record and enum in a schema, in definition order.
fn named_types<'a>(t: &'a Json, out: &mut Vec<&'a Json>) {
    match t {
        Json::Array(branches) => branches.iter().for_each(|b| named_types(b, out)),
        Json::Object(o) => match o.get("type").and_then(Json::as_str) {
            Some("record") => {
                out.push(t);
                if let Some(Json::Array(fields)) = o.get("fields") {
                    for f in fields {
                        if let Some(ft) = f.get("type") {
                            named_types(ft, out);
                        }
                    }
                }
            }
            Some("enum") => out.push(t),
            Some("array") => {
                if let Some(items) = o.get("items") {
                    named_types(items, out)
                }
            }
            Some("map") => {
                if let Some(values) = o.get("values") {
                    named_types(values, out)
                }
            }
            _ => {}
        },
        _ => {}
    }
}

fn str_of<'a>(v: &'a Json, key: &str) -> &'a str {
    v.get(key).and_then(Json::as_str).unwrap_or("")
}

/// Fields marked `"pii": true`, per record, across a schema.
pub fn pii_fields(set: &SchemaSet) -> Vec<PiiField> {
    let root = parse(set);
    let mut types = Vec::new();
    named_types(&root, &mut types);
    let mut out = Vec::new();
    for t in types {
        if let Some(Json::Array(fields)) = t.get("fields") {
            for f in fields {
                if f.get("pii").and_then(Json::as_bool) == Some(true) {
                    out.push(PiiField {
                        record: str_of(t, "name").to_owned(),
                        field: str_of(f, "name").to_owned(),
                    });
                }
            }
        }
    }
    out.sort();
    out.dedup();
    out
}

/// Renders the catalogue of every schema as Markdown.
pub fn markdown(sets: &[&SchemaSet]) -> String {
    let mut md = String::from(
        "# Event catalogue\n\n\
         Generated from `schemas/avro/*.avsc` by `cdp schemas catalog`; a test fails when this \
         file and the schemas disagree. Every record is framed with Avro single-object encoding \
         (`C3 01`, the 8-byte little-endian CRC-64-AVRO fingerprint of the writer schema's Parsing \
         Canonical Form as the Avro specification defines it, then the Avro binary datum): any Avro \
         implementation computes the same fingerprints from the `.avsc` files. Records written \
         before 2026-12 carry a legacy fingerprint per version (listed below), read as an alias of \
         the same version. Fields marked **PII** are sealed with the subject's data key \
         (AES-256-GCM) before they reach Kafka; their plaintext never enters the log.\n",
    );
    let mut seen = std::collections::BTreeSet::new();
    for set in sets {
        let root = parse(set);
        let current = set.current();
        md.push_str(&format!(
            "\n## `{}` — {}\n\n{}\n\n- Topic: {}\n- Current version: {} (fingerprint `{:016x}`); released versions: {}\n",
            set.name,
            str_of(&root, "name"),
            str_of(&root, "doc"),
            TOPICS.iter().find(|(n, _)| *n == set.name).map(|(_, t)| *t).unwrap_or("-"),
            current.version,
            current.fingerprint,
            set.versions()
                .iter()
                .map(|v| format!(
                    "v{} (`{:016x}`, legacy `{:016x}`)",
                    v.version, v.fingerprint, v.legacy_fingerprint
                ))
                .collect::<Vec<_>>()
                .join(", "),
        ));
        let event_types: Vec<String> = root
            .get("fields")
            .and_then(Json::as_array)
            .and_then(|f| f.iter().find(|f| str_of(f, "name") == "payload"))
            .and_then(|p| p.get("type"))
            .and_then(Json::as_array)
            .map(|b| {
                b.iter()
                    .map(|r| format!("`{}`", str_of(r, "name")))
                    .collect()
            })
            .unwrap_or_default();
        md.push_str(&format!("- Payload branches: {}\n", event_types.join(", ")));
        let mut types = Vec::new();
        named_types(&root, &mut types);
        for t in types {
            let name = str_of(t, "name");
            if !seen.insert(name.to_owned()) {
                continue;
            }
            md.push_str(&format!("\n### {name}\n\n"));
            let doc = str_of(t, "doc");
            if !doc.is_empty() {
                md.push_str(&format!("{doc}\n\n"));
            }
            if let Some(Json::Array(symbols)) = t.get("symbols") {
                let s: Vec<String> = symbols
                    .iter()
                    .filter_map(Json::as_str)
                    .map(|s| format!("`{s}`"))
                    .collect();
                md.push_str(&format!("Enum: {}\n", s.join(", ")));
                continue;
            }
            md.push_str("| field | type | PII | description |\n|---|---|---|---|\n");
            if let Some(Json::Array(fields)) = t.get("fields") {
                for f in fields {
                    let pii = if f.get("pii").and_then(Json::as_bool) == Some(true) {
                        "**PII**"
                    } else {
                        ""
                    };
                    md.push_str(&format!(
                        "| `{}` | {} | {} | {} |\n",
                        str_of(f, "name"),
                        f.get("type").map(type_name).unwrap_or_default(),
                        pii,
                        str_of(f, "doc").replace('|', "\\|"),
                    ));
                }
            }
        }
    }
    md
}
