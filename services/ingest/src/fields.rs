//! Reading untrusted JSON with errors that name each failing field by its path
//! (`batch[3].traits.email`). Reasons never echo the value: it may be PII.

use cdp_schemas::Amount;
use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::{Map, Value};

/// One failing field.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FieldError {
    pub path: String,
    pub reason: String,
}

impl FieldError {
    pub fn new(path: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            path: path.into(),
            reason: reason.into(),
        }
    }
}

/// Joins a base path and a key: `("traits", "email")` gives `traits.email`.
pub fn join(base: &str, key: &str) -> String {
    if base.is_empty() {
        key.to_owned()
    } else {
        format!("{base}.{key}")
    }
}

/// Collects field errors while a message is read.
#[derive(Debug, Default)]
pub struct Errors(pub Vec<FieldError>);

impl Errors {
    pub fn add(&mut self, path: impl Into<String>, reason: impl Into<String>) {
        self.0.push(FieldError::new(path, reason));
    }

    /// The value, or `None` after recording the error.
    pub fn check<T>(&mut self, r: Result<T, FieldError>) -> Option<T> {
        match r {
            Ok(v) => Some(v),
            Err(e) => {
                self.0.push(e);
                None
            }
        }
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// A JSON object being read, with its path.
#[derive(Clone)]
pub struct Obj<'a> {
    pub path: String,
    pub map: &'a Map<String, Value>,
}

impl<'a> Obj<'a> {
    pub fn new(path: impl Into<String>, v: &'a Value) -> Result<Self, FieldError> {
        let path = path.into();
        match v {
            Value::Object(map) => Ok(Self { path, map }),
            other => Err(FieldError::new(
                if path.is_empty() {
                    "body".to_owned()
                } else {
                    path
                },
                format!("expected an object, found {}", type_name(other)),
            )),
        }
    }

    fn present(&self, key: &str) -> Option<&'a Value> {
        self.map.get(key).filter(|v| !v.is_null())
    }

    pub fn has(&self, key: &str) -> bool {
        self.present(key).is_some()
    }

    pub fn path_of(&self, key: &str) -> String {
        join(&self.path, key)
    }

    pub fn opt_str(&self, key: &str) -> Result<Option<String>, FieldError> {
        match self.present(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(other) => Err(FieldError::new(
                self.path_of(key),
                format!("expected a string, found {}", type_name(other)),
            )),
        }
    }

    /// A required, non-blank string.
    pub fn str(&self, key: &str) -> Result<String, FieldError> {
        match self.opt_str(key)? {
            Some(s) if !s.trim().is_empty() => Ok(s),
            Some(_) => Err(FieldError::new(self.path_of(key), "must not be blank")),
            None => Err(FieldError::new(self.path_of(key), "is required")),
        }
    }

    /// An identifier: a string, or a number the SDK sent unquoted.
    pub fn opt_id(&self, key: &str) -> Result<Option<String>, FieldError> {
        match self.present(key) {
            None => Ok(None),
            Some(Value::String(s)) if s.trim().is_empty() => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(Value::Number(n)) => Ok(Some(n.to_string())),
            Some(other) => Err(FieldError::new(
                self.path_of(key),
                format!("expected a string, found {}", type_name(other)),
            )),
        }
    }

    pub fn opt_obj(&self, key: &str) -> Result<Option<Obj<'a>>, FieldError> {
        match self.present(key) {
            None => Ok(None),
            Some(Value::Object(map)) => Ok(Some(Obj {
                path: self.path_of(key),
                map,
            })),
            Some(other) => Err(FieldError::new(
                self.path_of(key),
                format!("expected an object, found {}", type_name(other)),
            )),
        }
    }

    pub fn opt_i64(&self, key: &str) -> Result<Option<i64>, FieldError> {
        match self.present(key) {
            None => Ok(None),
            Some(Value::Number(n)) => n
                .as_i64()
                .or_else(|| {
                    n.as_f64()
                        .filter(|f| f.fract() == 0.0 && f.abs() < 9e15)
                        .map(|f| f as i64)
                })
                .map(Some)
                .ok_or_else(|| FieldError::new(self.path_of(key), "expected an integer")),
            Some(other) => Err(FieldError::new(
                self.path_of(key),
                format!("expected an integer, found {}", type_name(other)),
            )),
        }
    }

    /// A decimal amount, from a JSON number or a numeric string.
    pub fn opt_amount(&self, key: &str) -> Result<Option<Amount>, FieldError> {
        let text = match self.present(key) {
            None => return Ok(None),
            Some(Value::Number(n)) => n.to_string(),
            Some(Value::String(s)) => s.clone(),
            Some(other) => {
                return Err(FieldError::new(
                    self.path_of(key),
                    format!("expected a decimal amount, found {}", type_name(other)),
                ))
            }
        };
        // serde_json prints large or tiny floats in exponent form; fall back to a fixed format.
        let parsed = text.parse::<Amount>().or_else(|e| {
            text.parse::<f64>()
                .ok()
                .filter(|f| f.is_finite())
                .and_then(|f| format!("{f:.4}").parse::<Amount>().ok())
                .ok_or(e)
        });
        parsed.map(Some).map_err(|_| {
            FieldError::new(
                self.path_of(key),
                "expected a decimal amount with at most 4 decimal places",
            )
        })
    }

    pub fn opt_bool(&self, key: &str) -> Result<Option<bool>, FieldError> {
        match self.present(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(other) => Err(FieldError::new(
                self.path_of(key),
                format!("expected a boolean, found {}", type_name(other)),
            )),
        }
    }

    pub fn opt_array(&self, key: &str) -> Result<Option<&'a Vec<Value>>, FieldError> {
        match self.present(key) {
            None => Ok(None),
            Some(Value::Array(a)) => Ok(Some(a)),
            Some(other) => Err(FieldError::new(
                self.path_of(key),
                format!("expected an array, found {}", type_name(other)),
            )),
        }
    }

    /// An ISO-8601 / RFC 3339 timestamp.
    pub fn opt_time(&self, key: &str) -> Result<Option<DateTime<Utc>>, FieldError> {
        match self.opt_str(key)? {
            None => Ok(None),
            Some(s) => DateTime::parse_from_rfc3339(s.trim())
                .map(|t| Some(t.with_timezone(&Utc)))
                .map_err(|_| FieldError::new(self.path_of(key), "is not an ISO-8601 timestamp")),
        }
    }

    /// The object without the given keys, as JSON text (`None` if nothing is left).
    pub fn rest_json(&self, without: &[&str]) -> Option<String> {
        let rest: Map<String, Value> = self
            .map
            .iter()
            .filter(|(k, v)| !without.contains(&k.as_str()) && !v.is_null())
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        (!rest.is_empty()).then(|| Value::Object(rest).to_string())
    }
}

/// Text from a request as the service logs and stores it (paths, the rejection log's message
/// id): NUL characters written `\u0000`, since Postgres refuses NUL in text.
pub fn spell_nul(text: &str) -> std::borrow::Cow<'_, str> {
    if text.contains('\0') {
        text.replace('\0', "\\u0000").into()
    } else {
        text.into()
    }
}

/// Every string of a message, key or value at any depth, that holds a NUL character
/// (U+0000), by path. Such a message is refused whole: Postgres stores no NUL in text or
/// `jsonb`, so the value could not be projected as sent, and silently changing it would
/// change the data. Other control characters are kept as sent.
pub fn nul_characters(path: &str, v: &Value) -> Vec<FieldError> {
    fn walk(path: &str, v: &Value, out: &mut Vec<FieldError>) {
        const REASON: &str = "contains a NUL character (U+0000), which is not accepted";
        match v {
            Value::String(s) if s.contains('\0') => out.push(FieldError::new(
                if path.is_empty() { "body" } else { path },
                REASON,
            )),
            Value::Array(items) => {
                for (i, item) in items.iter().enumerate() {
                    walk(&format!("{path}[{i}]"), item, out);
                }
            }
            Value::Object(map) => {
                for (k, item) in map {
                    let p = join(path, &spell_nul(k));
                    if k.contains('\0') {
                        out.push(FieldError::new(p.clone(), format!("key {REASON}")));
                    }
                    walk(&p, item, out);
                }
            }
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk(path, v, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn every_nul_is_named_by_its_path_and_other_control_characters_pass() {
        let v = json!({
            "event": "Sign\u{0}up",
            "properties": {"plan": "pro", "list": ["a", "b\u{0}"], "k\u{0}ey": 1},
            "traits": {"name": "tab\there\u{1}\u{7f}"}
        });
        let errors = nul_characters("batch[2]", &v);
        let paths: Vec<&str> = errors.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "batch[2].event",
                "batch[2].properties.k\\u0000ey",
                "batch[2].properties.list[1]"
            ]
        );
        assert!(errors
            .iter()
            .all(|e| !e.path.contains('\0') && !e.reason.contains('\0')));
        assert!(nul_characters("", &json!({"traits": {"name": "tab\there\u{1b}"}})).is_empty());
        assert_eq!(nul_characters("", &json!("\u{0}"))[0].path, "body");
    }
}
