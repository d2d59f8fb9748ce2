//! The Avro specification's Parsing Canonical Form of a schema and its CRC-64-AVRO (Rabin)
//! fingerprint: what the single-object header carries, and what every other implementation
//! (Java's `SchemaNormalization`, fastavro, avro-python) computes from the same `.avsc`.
//!
//! The form is built from the schema's JSON, by the specification's rules: primitives in
//! their simple form (a logical type on a primitive is dropped, `{"type": "string",
//! "logicalType": "uuid"}` is `"string"`), names replaced by full names, only `name`,
//! `type`, `fields`, `symbols`, `items`, `values` and `size` kept, in that order, no
//! whitespace; a named type defined earlier in the schema is written as its full name.

use std::collections::HashSet;

use serde_json::{Map, Value as Json};

/// Why a schema text has no canonical form.
#[derive(Debug, thiserror::Error)]
pub enum CanonicalError {
    #[error("the schema is not JSON")]
    Json(#[source] serde_json::Error),
    #[error("{0}")]
    Shape(String),
}

const PRIMITIVES: [&str; 8] = [
    "null", "boolean", "int", "long", "float", "double", "bytes", "string",
];

/// CRC-64-AVRO of `bytes`, as the specification defines it (the single-object header carries
/// it little-endian).
pub fn rabin(bytes: &[u8]) -> u64 {
    const EMPTY: u64 = 0xc15d_213a_a4d7_a795;
    const TABLE: [u64; 256] = {
        let mut table = [0u64; 256];
        let mut i = 0;
        while i < 256 {
            let mut fp = i as u64;
            let mut j = 0;
            while j < 8 {
                fp = (fp >> 1) ^ (EMPTY & (fp & 1).wrapping_neg());
                j += 1;
            }
            table[i] = fp;
            i += 1;
        }
        table
    };
    bytes.iter().fold(EMPTY, |fp, b| {
        (fp >> 8) ^ TABLE[((fp ^ u64::from(*b)) & 0xff) as usize]
    })
}

/// The Parsing Canonical Form of a schema given as JSON text.
pub fn parsing_canonical_form(source: &str) -> Result<String, CanonicalError> {
    let json: Json = serde_json::from_str(source).map_err(CanonicalError::Json)?;
    let mut out = String::with_capacity(source.len() / 2);
    Form::default().write(&json, "", &mut out)?;
    Ok(out)
}

/// The specification's fingerprint of a schema given as JSON text.
pub fn fingerprint(source: &str) -> Result<u64, CanonicalError> {
    parsing_canonical_form(source).map(|form| rabin(form.as_bytes()))
}

fn shape(what: impl Into<String>) -> CanonicalError {
    CanonicalError::Shape(what.into())
}

/// The full name of `name` met in namespace `enclosing`: a dotted name is full already.
fn full_name(name: &str, namespace: Option<&str>, enclosing: &str) -> String {
    if name.contains('.') {
        return name.to_owned();
    }
    match namespace.unwrap_or(enclosing) {
        "" => name.to_owned(),
        ns => format!("{ns}.{name}"),
    }
}

/// The namespace a full name defines for the types nested in it.
fn namespace_of(full: &str) -> &str {
    full.rsplit_once('.').map_or("", |(ns, _)| ns)
}

fn quoted(s: &str, out: &mut String) {
    out.push('"');
    out.push_str(s);
    out.push('"');
}

/// Named types already written (later uses are written as their full name).
#[derive(Default)]
struct Form {
    defined: HashSet<String>,
}

impl Form {
    fn write(
        &mut self,
        schema: &Json,
        namespace: &str,
        out: &mut String,
    ) -> Result<(), CanonicalError> {
        match schema {
            Json::String(s) if PRIMITIVES.contains(&s.as_str()) => quoted(s, out),
            Json::String(s) => quoted(&full_name(s, None, namespace), out),
            Json::Array(branches) => {
                out.push('[');
                for (i, b) in branches.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    self.write(b, namespace, out)?;
                }
                out.push(']');
            }
            Json::Object(o) => self.write_object(o, namespace, out)?,
            other => return Err(shape(format!("{other} is not a schema"))),
        }
        Ok(())
    }

    fn write_object(
        &mut self,
        o: &Map<String, Json>,
        namespace: &str,
        out: &mut String,
    ) -> Result<(), CanonicalError> {
        let ty = match o.get("type") {
            Some(Json::String(t)) => t.as_str(),
            // `{"type": {...}}` or `{"type": [...]}`: the inner schema is the schema.
            Some(inner) => return self.write(inner, namespace, out),
            None => return Err(shape("an object schema without \"type\"")),
        };
        match ty {
            "record" | "error" | "enum" | "fixed" => {
                let name = o
                    .get("name")
                    .and_then(Json::as_str)
                    .ok_or_else(|| shape(format!("a {ty} without a name")))?;
                let full = full_name(name, o.get("namespace").and_then(Json::as_str), namespace);
                if !self.defined.insert(full.clone()) {
                    quoted(&full, out);
                    return Ok(());
                }
                out.push_str("{\"name\":");
                quoted(&full, out);
                out.push_str(",\"type\":");
                match ty {
                    "enum" => {
                        out.push_str("\"enum\",\"symbols\":[");
                        let symbols = o
                            .get("symbols")
                            .and_then(Json::as_array)
                            .ok_or_else(|| shape(format!("enum {full} without symbols")))?;
                        for (i, s) in symbols.iter().enumerate() {
                            if i > 0 {
                                out.push(',');
                            }
                            let s = s.as_str().ok_or_else(|| {
                                shape(format!("a symbol of {full} is not a string"))
                            })?;
                            quoted(s, out);
                        }
                        out.push(']');
                    }
                    "fixed" => {
                        let size = o
                            .get("size")
                            .and_then(Json::as_u64)
                            .ok_or_else(|| shape(format!("fixed {full} without a size")))?;
                        out.push_str("\"fixed\",\"size\":");
                        out.push_str(&size.to_string());
                    }
                    _ => {
                        out.push_str("\"record\",\"fields\":[");
                        let inner = namespace_of(&full).to_owned();
                        let fields = o
                            .get("fields")
                            .and_then(Json::as_array)
                            .ok_or_else(|| shape(format!("record {full} without fields")))?;
                        for (i, f) in fields.iter().enumerate() {
                            if i > 0 {
                                out.push(',');
                            }
                            let field = f.get("name").and_then(Json::as_str).ok_or_else(|| {
                                shape(format!("a field of {full} without a name"))
                            })?;
                            let field_type = f.get("type").ok_or_else(|| {
                                shape(format!("field {full}.{field} without a type"))
                            })?;
                            out.push_str("{\"name\":");
                            quoted(field, out);
                            out.push_str(",\"type\":");
                            self.write(field_type, &inner, out)?;
                            out.push('}');
                        }
                        out.push(']');
                    }
                }
                out.push('}');
            }
            "array" | "map" => {
                let (key, what) = if ty == "array" {
                    ("items", "array")
                } else {
                    ("values", "map")
                };
                let inner = o
                    .get(key)
                    .ok_or_else(|| shape(format!("an {what} without {key}")))?;
                out.push_str("{\"type\":");
                quoted(what, out);
                out.push_str(",\"");
                out.push_str(key);
                out.push_str("\":");
                self.write(inner, namespace, out)?;
                out.push('}');
            }
            // A primitive with attributes (a logical type): its simple form. Or a reference
            // to a named type written as `{"type": "Name"}`.
            other => self.write(&Json::String(other.to_owned()), namespace, out)?,
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_specifications_test_vectors() {
        // From the Avro specification's schema-tests (Java's `SchemaNormalization` test data),
        // as the signed longs Java prints.
        assert_eq!(rabin(b"\"null\"") as i64, 7_195_948_357_588_979_594);
        assert_eq!(
            parsing_canonical_form(r#"{"type": "int", "logicalType": "date"}"#)
                .ok()
                .as_deref(),
            Some("\"int\"")
        );
    }

    #[test]
    fn names_become_full_names_and_only_parsing_attributes_stay() {
        let schema = r#"{
            "type": "record", "name": "Outer", "namespace": "a.b", "doc": "dropped",
            "fields": [
                {"name": "inner", "type": {"type": "record", "name": "Inner", "aliases": ["x"],
                    "fields": [{"name": "e", "type": {"type": "enum", "name": "c.E", "symbols": ["X", "Y"]}}]}},
                {"name": "again", "type": "Inner", "default": {}},
                {"name": "amount", "type": {"type": "bytes", "logicalType": "decimal", "precision": 18, "scale": 4}},
                {"name": "hash", "type": {"type": "fixed", "name": "H", "namespace": "", "size": 16}},
                {"name": "tags", "type": {"type": "map", "values": {"type": "array", "items": "c.E"}}},
                {"name": "maybe", "type": ["null", {"type": "string", "logicalType": "uuid"}], "default": null}
            ]
        }"#;
        assert_eq!(
            parsing_canonical_form(schema).ok().as_deref(),
            Some(concat!(
                r#"{"name":"a.b.Outer","type":"record","fields":["#,
                r#"{"name":"inner","type":{"name":"a.b.Inner","type":"record","fields":["#,
                r#"{"name":"e","type":{"name":"c.E","type":"enum","symbols":["X","Y"]}}]}},"#,
                r#"{"name":"again","type":"a.b.Inner"},"#,
                r#"{"name":"amount","type":"bytes"},"#,
                r#"{"name":"hash","type":{"name":"H","type":"fixed","size":16}},"#,
                r#"{"name":"tags","type":{"type":"map","values":{"type":"array","items":"c.E"}}},"#,
                r#"{"name":"maybe","type":["null","string"]}]}"#
            ))
        );
    }

    #[test]
    fn a_schema_that_is_not_one_is_an_error() {
        assert!(parsing_canonical_form("{").is_err());
        assert!(parsing_canonical_form("{\"type\": \"record\", \"name\": \"R\"}").is_err());
        assert!(parsing_canonical_form("42").is_err());
    }
}
