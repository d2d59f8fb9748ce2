//! Schema resolution by the specification's rules: a datum decoded with its writer schema,
//! brought to the reader (current) schema.
//!
//! `apache-avro` resolves values itself, but not by the specification: a union is resolved
//! to the first reader branch the value happens to fit (for a union of records with optional
//! fields, usually the wrong record), and a `bytes` decimal shorter than its precision's
//! maximum is refused. Here unions map branch to branch by name or type, records field to
//! field by name (writer fields already renamed by the reader's aliases, see
//! `crate::aliases`), enums symbol to symbol, and primitives are promoted as the
//! specification allows. Only a missing field's default is resolved by `apache-avro`.

use apache_avro::schema::NamesRef;
use apache_avro::types::Value;
use apache_avro::Schema;

/// Why a datum could not be brought to the reader's schema.
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error("a field's default: {0}")]
    Default(#[source] Box<apache_avro::Error>),
    #[error("{0}")]
    Shape(&'static str),
}

/// The named types of the writer's and the reader's schemas.
pub(crate) struct Names<'a> {
    pub writer: &'a NamesRef<'a>,
    pub reader: &'a NamesRef<'a>,
}

fn deref<'a>(s: &'a Schema, names: &'a NamesRef<'a>) -> &'a Schema {
    match s {
        Schema::Ref { name } => names.get(name).copied().unwrap_or(s),
        _ => s,
    }
}

/// Whether data written as `w` can be read as `r` (the specification's matching rules).
fn matches(w: &Schema, r: &Schema) -> bool {
    use Schema::*;
    match (w, r) {
        (Record(a), Record(b)) => a.name.name() == b.name.name(),
        (Enum(a), Enum(b)) => a.name.name() == b.name.name(),
        (Fixed(a), Fixed(b)) => a.name.name() == b.name.name() && a.size == b.size,
        (Array(_), Array(_)) | (Map(_), Map(_)) => true,
        (Int, Long | Float | Double) | (Long, Float | Double) | (Float, Double) => true,
        (String, Bytes) | (Bytes, String) => true,
        (Decimal(a), Decimal(b)) => a.scale == b.scale && a.precision <= b.precision,
        (Union(_), _) | (_, Union(_)) => false,
        _ => std::mem::discriminant(w) == std::mem::discriminant(r),
    }
}

fn union_index(j: usize) -> Result<u32, ResolveError> {
    u32::try_from(j).map_err(|_| ResolveError::Shape("a union with too many branches"))
}

/// The writer's branch `i` of its union.
fn written<'a>(
    wu: &'a apache_avro::schema::UnionSchema,
    i: u32,
    names: &'a Names<'a>,
) -> Result<&'a Schema, ResolveError> {
    wu.variants()
        .get(usize::try_from(i).unwrap_or(usize::MAX))
        .map(|s| deref(s, names.writer))
        .ok_or(ResolveError::Shape("a union branch out of range"))
}

/// The first branch of the reader's union that data written as `w` matches.
fn branch<'a>(
    ru: &'a apache_avro::schema::UnionSchema,
    w: &Schema,
    names: &'a Names<'a>,
) -> Result<(u32, &'a Schema), ResolveError> {
    let (j, rs) = ru
        .variants()
        .iter()
        .enumerate()
        .find(|(_, rs)| matches(w, deref(rs, names.reader)))
        .ok_or(ResolveError::Shape(
            "a type or union branch the reader's union does not have",
        ))?;
    Ok((union_index(j)?, rs))
}

/// `value`, written with schema `w`, as schema `r` reads it.
pub(crate) fn resolve(
    value: Value,
    w: &Schema,
    r: &Schema,
    names: &Names<'_>,
) -> Result<Value, ResolveError> {
    let (w, r) = (deref(w, names.writer), deref(r, names.reader));
    match (w, r, value) {
        (Schema::Union(wu), Schema::Union(ru), Value::Union(i, inner)) => {
            let ws = written(wu, i, names)?;
            let (j, rs) = branch(ru, ws, names)?;
            Ok(Value::Union(j, Box::new(resolve(*inner, ws, rs, names)?)))
        }
        (Schema::Union(wu), _, Value::Union(i, inner)) => {
            resolve(*inner, written(wu, i, names)?, r, names)
        }
        (_, Schema::Union(ru), v) => {
            let (j, rs) = branch(ru, w, names)?;
            Ok(Value::Union(j, Box::new(resolve(v, w, rs, names)?)))
        }
        (Schema::Record(wr), Schema::Record(rr), Value::Record(fields)) => {
            let mut written: Vec<(String, Value)> = fields;
            let mut out = Vec::with_capacity(rr.fields.len());
            for rf in &rr.fields {
                let found = written.iter().position(|(n, _)| *n == rf.name);
                let wf = wr.fields.iter().find(|f| f.name == rf.name);
                let v = match (found, wf) {
                    (Some(at), Some(wf)) => {
                        let (_, v) = written.swap_remove(at);
                        resolve(v, &wf.schema, &rf.schema, names)?
                    }
                    _ => {
                        let d = rf.default.clone().ok_or(ResolveError::Shape(
                            "a reader field without default that the writer does not have",
                        ))?;
                        Value::try_from(d)
                            .and_then(|v| v.resolve_with_names(&rf.schema, names.reader))
                            .map_err(|e| ResolveError::Default(Box::new(e)))?
                    }
                };
                out.push((rf.name.clone(), v));
            }
            Ok(Value::Record(out))
        }
        (Schema::Enum(_), Schema::Enum(re), Value::Enum(_, symbol)) => {
            let symbol = if re.symbols.contains(&symbol) {
                symbol
            } else {
                re.default.clone().ok_or(ResolveError::Shape(
                    "an enum symbol the reader does not have",
                ))?
            };
            let at = re
                .symbols
                .iter()
                .position(|s| *s == symbol)
                .ok_or(ResolveError::Shape("an enum default that is not a symbol"))?;
            Ok(Value::Enum(union_index(at)?, symbol))
        }
        (Schema::Array(wa), Schema::Array(ra), Value::Array(items)) => items
            .into_iter()
            .map(|v| resolve(v, &wa.items, &ra.items, names))
            .collect::<Result<_, _>>()
            .map(Value::Array),
        (Schema::Map(wm), Schema::Map(rm), Value::Map(entries)) => entries
            .into_iter()
            .map(|(k, v)| Ok((k, resolve(v, &wm.types, &rm.types, names)?)))
            .collect::<Result<_, _>>()
            .map(Value::Map),
        (_, Schema::Long, Value::Int(i)) => Ok(Value::Long(i64::from(i))),
        (_, Schema::Float, Value::Int(i)) => Ok(Value::Float(i as f32)),
        (_, Schema::Float, Value::Long(i)) => Ok(Value::Float(i as f32)),
        (_, Schema::Double, Value::Int(i)) => Ok(Value::Double(f64::from(i))),
        (_, Schema::Double, Value::Long(i)) => Ok(Value::Double(i as f64)),
        (_, Schema::Double, Value::Float(f)) => Ok(Value::Double(f64::from(f))),
        (_, Schema::String, Value::Bytes(b)) => String::from_utf8(b)
            .map(Value::String)
            .map_err(|_| ResolveError::Shape("bytes that are not UTF-8 read as a string")),
        (_, Schema::Bytes, Value::String(s)) => Ok(Value::Bytes(s.into_bytes())),
        (_, _, v) if matches(w, r) => Ok(v),
        _ => Err(ResolveError::Shape(
            "the writer's type cannot be read as the reader's",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use apache_avro::schema::ResolvedSchema;

    fn parse(s: &str) -> Schema {
        Schema::parse_str(s).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn unions_map_by_name_records_by_field_and_numbers_promote() {
        let w = parse(
            r#"{"type": "record", "name": "E", "fields": [
              {"name": "n", "type": "int"},
              {"name": "kind", "type": {"type": "enum", "name": "K", "symbols": ["A", "B"]}},
              {"name": "p", "type": [
                {"type": "record", "name": "One", "fields": [{"name": "x", "type": ["null", "string"], "default": null}]},
                {"type": "record", "name": "Two", "fields": [{"name": "x", "type": ["null", "string"], "default": null}]}]}]}"#,
        );
        let r = parse(
            r#"{"type": "record", "name": "E", "fields": [
              {"name": "n", "type": "long"},
              {"name": "kind", "type": {"type": "enum", "name": "K", "symbols": ["A", "B", "C"]}},
              {"name": "p", "type": [
                {"type": "record", "name": "One", "fields": [{"name": "x", "type": ["null", "string"], "default": null}]},
                {"type": "record", "name": "Two", "fields": [{"name": "x", "type": ["null", "string"], "default": null},
                                                            {"name": "y", "type": "string", "default": "d"}]}]},
              {"name": "added", "type": ["null", "long"], "default": null}]}"#,
        );
        let value = Value::Record(vec![
            ("n".into(), Value::Int(7)),
            ("kind".into(), Value::Enum(1, "B".into())),
            (
                "p".into(),
                Value::Union(
                    1,
                    Box::new(Value::Record(vec![(
                        "x".into(),
                        Value::Union(0, Box::new(Value::Null)),
                    )])),
                ),
            ),
        ]);
        let (wn, rn) = (
            ResolvedSchema::new(&w).unwrap_or_else(|e| panic!("{e}")),
            ResolvedSchema::new(&r).unwrap_or_else(|e| panic!("{e}")),
        );
        let names = Names {
            writer: wn.get_names(),
            reader: rn.get_names(),
        };
        let got = resolve(value, &w, &r, &names).unwrap_or_else(|e| panic!("{e}"));
        let Value::Record(fields) = got else {
            panic!("not a record")
        };
        assert_eq!(fields[0], ("n".into(), Value::Long(7)));
        assert_eq!(fields[1], ("kind".into(), Value::Enum(1, "B".into())));
        let Value::Union(1, two) = &fields[2].1 else {
            panic!("the second branch stays the second (Two), although One would fit it")
        };
        assert_eq!(
            **two,
            Value::Record(vec![
                ("x".into(), Value::Union(0, Box::new(Value::Null))),
                ("y".into(), Value::String("d".into())),
            ])
        );
        assert_eq!(
            fields[3],
            ("added".into(), Value::Union(0, Box::new(Value::Null)))
        );
    }
}
