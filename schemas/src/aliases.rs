//! Field aliases in schema resolution. The specification resolves a writer's field to the
//! reader field that names it among its `aliases`; `apache-avro` resolves values by field
//! name only. Field names do not take part in the binary encoding, so the writer schema can
//! be rewritten with the reader's names before decoding (as Java's `Schema.applyAliases`
//! does): the datum decodes the same and resolves by name.

use std::collections::HashMap;

use serde_json::Value;

/// Record full name → (alias → reader field name).
type Renames = HashMap<String, HashMap<String, String>>;

fn full_name(obj: &serde_json::Map<String, Value>, enclosing: &str) -> Option<(String, String)> {
    let name = obj.get("name")?.as_str()?;
    if let Some((ns, _)) = name.rsplit_once('.') {
        return Some((name.to_owned(), ns.to_owned()));
    }
    let ns = obj
        .get("namespace")
        .and_then(Value::as_str)
        .unwrap_or(enclosing);
    let full = if ns.is_empty() {
        name.to_owned()
    } else {
        format!("{ns}.{name}")
    };
    Some((full, ns.to_owned()))
}

/// Calls `f` on every record of a schema, with its full name, and walks into the schemas
/// its fields, arrays, maps and unions hold.
fn walk(schema: &mut Value, enclosing: &str, f: &mut dyn FnMut(&str, &mut Vec<Value>)) {
    match schema {
        Value::Array(branches) => {
            for b in branches {
                walk(b, enclosing, f);
            }
        }
        Value::Object(obj) => {
            match obj.get("type").and_then(Value::as_str) {
                Some("record") | Some("error") => {
                    let Some((full, ns)) = full_name(obj, enclosing) else {
                        return;
                    };
                    if let Some(Value::Array(fields)) = obj.get_mut("fields") {
                        f(&full, fields);
                        for field in fields.iter_mut() {
                            if let Some(t) = field.get_mut("type") {
                                walk(t, &ns, f);
                            }
                        }
                    }
                }
                Some("array") => {
                    if let Some(items) = obj.get_mut("items") {
                        walk(items, enclosing, f);
                    }
                }
                Some("map") => {
                    if let Some(values) = obj.get_mut("values") {
                        walk(values, enclosing, f);
                    }
                }
                // `{"type": {...}}` wrapping a schema.
                Some(_) | None => {
                    if let Some(inner @ (Value::Object(_) | Value::Array(_))) = obj.get_mut("type")
                    {
                        walk(inner, enclosing, f);
                    }
                }
            }
        }
        _ => {}
    }
}

/// The writer schema (`.avsc` text) with every field a reader field aliases renamed to the
/// reader's name. Schemas that are not JSON come back unchanged (parsing them fails later,
/// with the parser's error).
pub(crate) fn apply_field_aliases(writer: &str, reader: &str) -> String {
    let (Ok(mut w), Ok(mut r)) = (
        serde_json::from_str::<Value>(writer),
        serde_json::from_str::<Value>(reader),
    ) else {
        return writer.to_owned();
    };
    let mut renames = Renames::new();
    walk(&mut r, "", &mut |record, fields| {
        for field in fields.iter() {
            let (Some(name), Some(Value::Array(aliases))) = (
                field.get("name").and_then(Value::as_str),
                field.get("aliases"),
            ) else {
                continue;
            };
            let entry = renames.entry(record.to_owned()).or_default();
            for alias in aliases.iter().filter_map(Value::as_str) {
                entry.insert(alias.to_owned(), name.to_owned());
            }
        }
    });
    if renames.is_empty() {
        return writer.to_owned();
    }
    let mut changed = false;
    walk(&mut w, "", &mut |record, fields| {
        let Some(map) = renames.get(record) else {
            return;
        };
        let present: Vec<String> = fields
            .iter()
            .filter_map(|f| f.get("name").and_then(Value::as_str).map(str::to_owned))
            .collect();
        for field in fields.iter_mut() {
            let Some(name) = field.get("name").and_then(Value::as_str) else {
                continue;
            };
            // A writer field keeps its name when the reader still has a field of that name.
            if let Some(to) = map.get(name).filter(|to| !present.contains(to)) {
                field["name"] = Value::String(to.clone());
                changed = true;
            }
        }
    });
    if changed {
        w.to_string()
    } else {
        writer.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aliased_fields_take_the_readers_name_in_nested_named_records() {
        let writer = r#"{"type": "record", "name": "E", "namespace": "cdp.x", "fields": [
            {"name": "ids", "type": {"type": "array", "items": {"type": "record", "name": "Id",
              "namespace": "cdp.common", "fields": [{"name": "value_hash", "type": "string"},
                                                    {"name": "kind", "type": "string"}]}}},
            {"name": "other", "type": ["null", {"type": "record", "name": "Id2",
              "fields": [{"name": "value_hash", "type": "string"}]}]}]}"#;
        let reader = r#"{"type": "record", "name": "E", "namespace": "cdp.x", "fields": [
            {"name": "ids", "type": {"type": "array", "items": {"type": "record", "name": "Id",
              "namespace": "cdp.common", "fields": [{"name": "token", "type": "string",
              "aliases": ["value_hash"]}, {"name": "kind", "type": "string"}]}}},
            {"name": "other", "type": ["null", {"type": "record", "name": "Id2",
              "fields": [{"name": "value_hash", "type": "string"}]}]}]}"#;
        let out: Value = serde_json::from_str(&apply_field_aliases(writer, reader))
            .unwrap_or_else(|e| panic!("{e}"));
        let id = &out["fields"][0]["type"]["items"]["fields"];
        assert_eq!(id[0]["name"], "token");
        assert_eq!(id[1]["name"], "kind");
        assert_eq!(
            out["fields"][1]["type"][1]["fields"][0]["name"], "value_hash",
            "another record (cdp.x.Id2) keeps its field"
        );
        assert_eq!(apply_field_aliases(writer, writer), writer, "no aliases");
    }
}
