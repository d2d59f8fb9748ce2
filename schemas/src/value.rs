//! Conversions between typed events and `apache_avro::types::Value`.
//!
//! Written by hand rather than through serde so that every branch of every union is
//! explicit and every decoding failure names the record and field at fault.

use apache_avro::types::Value;
use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::error::ContractError;
use crate::model::common::{Amount, Sealed};

/// An Avro enum mirrored by a Rust enum: symbols in schema order.
pub(crate) trait AvroEnum: Sized + Copy + 'static {
    const SYMBOLS: &'static [&'static str];
    const ALL: &'static [Self];
    fn index(self) -> usize;

    fn to_value(self) -> Value {
        let i = self.index();
        Value::Enum(i as u32, Self::SYMBOLS[i].to_owned())
    }
}

/// Declares a Rust enum whose variants match an Avro enum's symbols, in order.
macro_rules! avro_enum {
    ($(#[$meta:meta])* pub enum $name:ident { $($variant:ident = $symbol:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name { $($variant),+ }

        impl $crate::value::AvroEnum for $name {
            const SYMBOLS: &'static [&'static str] = &[$($symbol),+];
            const ALL: &'static [Self] = &[$(Self::$variant),+];
            fn index(self) -> usize {
                self as usize
            }
        }

        impl $name {
            /// The variant of an Avro symbol (exact match).
            pub fn from_symbol(symbol: &str) -> Option<Self> {
                <Self as $crate::value::AvroEnum>::SYMBOLS
                    .iter()
                    .position(|s| *s == symbol)
                    .map(|i| <Self as $crate::value::AvroEnum>::ALL[i])
            }

            /// The Avro symbols, in schema order.
            pub fn symbols() -> &'static [&'static str] {
                <Self as $crate::value::AvroEnum>::SYMBOLS
            }

            /// The Avro symbol of this variant.
            pub fn as_str(self) -> &'static str {
                <Self as $crate::value::AvroEnum>::SYMBOLS[$crate::value::AvroEnum::index(self)]
            }
        }
    };
}
pub(crate) use avro_enum;

pub(crate) fn record(fields: Vec<(&str, Value)>) -> Value {
    Value::Record(fields.into_iter().map(|(k, v)| (k.to_owned(), v)).collect())
}

pub(crate) fn string(s: &str) -> Value {
    Value::String(s.to_owned())
}

pub(crate) fn ts(t: &DateTime<Utc>) -> Value {
    Value::TimestampMicros(t.timestamp_micros())
}

pub(crate) fn uuid(u: &Uuid) -> Value {
    Value::Uuid(*u)
}

/// A `["null", T]` union.
pub(crate) fn opt<T>(v: Option<T>, f: impl FnOnce(T) -> Value) -> Value {
    match v {
        None => Value::Union(0, Box::new(Value::Null)),
        Some(x) => Value::Union(1, Box::new(f(x))),
    }
}

pub(crate) fn opt_string(v: &Option<String>) -> Value {
    opt(v.as_deref(), string)
}

pub(crate) fn opt_long(v: Option<i64>) -> Value {
    opt(v, Value::Long)
}

pub(crate) fn sealed(v: &Option<Sealed>) -> Value {
    opt(v.as_ref(), |s| Value::Bytes(s.as_bytes().to_vec()))
}

pub(crate) fn decimal(a: Amount) -> Value {
    Value::Decimal(apache_avro::Decimal::from(a.to_twos_complement()))
}

pub(crate) fn long_map(m: &std::collections::BTreeMap<String, i64>) -> Value {
    Value::Map(
        m.iter()
            .map(|(k, v)| (k.clone(), Value::Long(*v)))
            .collect(),
    )
}

pub(crate) fn string_array(items: &[String]) -> Value {
    Value::Array(items.iter().map(|s| string(s)).collect())
}

pub(crate) fn uuid_array(items: &[Uuid]) -> Value {
    Value::Array(items.iter().map(uuid).collect())
}

fn describe(v: &Value) -> String {
    let s = format!("{v:?}");
    match s.find('(') {
        Some(i) => s[..i].to_owned(),
        None => s,
    }
}

/// Reads the fields of one Avro record, naming the record and field in every error.
pub(crate) struct Fields {
    record: &'static str,
    fields: Vec<(String, Value)>,
}

impl Fields {
    pub(crate) fn new(record: &'static str, v: Value) -> Result<Self, ContractError> {
        match v {
            Value::Record(fields) => Ok(Self { record, fields }),
            other => Err(ContractError::NotARecord {
                record,
                found: describe(&other),
            }),
        }
    }

    fn wrong(&self, field: &'static str, expected: &'static str, v: &Value) -> ContractError {
        ContractError::WrongType {
            record: self.record,
            field,
            expected,
            found: describe(v),
        }
    }

    pub(crate) fn take(&mut self, field: &'static str) -> Result<Value, ContractError> {
        let pos = self.fields.iter().position(|(k, _)| k == field).ok_or(
            ContractError::MissingField {
                record: self.record,
                field,
            },
        )?;
        Ok(self.fields.swap_remove(pos).1)
    }

    /// The value of a `["null", T]` field, `None` for null.
    fn take_opt(&mut self, field: &'static str) -> Result<Option<Value>, ContractError> {
        match self.take(field)? {
            Value::Union(_, inner) => match *inner {
                Value::Null => Ok(None),
                v => Ok(Some(v)),
            },
            Value::Null => Ok(None),
            v => Ok(Some(v)),
        }
    }

    pub(crate) fn string(&mut self, field: &'static str) -> Result<String, ContractError> {
        match self.take(field)? {
            Value::String(s) => Ok(s),
            v => Err(self.wrong(field, "string", &v)),
        }
    }

    pub(crate) fn opt_string(
        &mut self,
        field: &'static str,
    ) -> Result<Option<String>, ContractError> {
        match self.take_opt(field)? {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(v) => Err(self.wrong(field, "string or null", &v)),
        }
    }

    pub(crate) fn int(&mut self, field: &'static str) -> Result<i32, ContractError> {
        match self.take(field)? {
            Value::Int(i) => Ok(i),
            v => Err(self.wrong(field, "int", &v)),
        }
    }

    pub(crate) fn long(&mut self, field: &'static str) -> Result<i64, ContractError> {
        match self.take(field)? {
            Value::Long(i) => Ok(i),
            Value::Int(i) => Ok(i64::from(i)),
            v => Err(self.wrong(field, "long", &v)),
        }
    }

    pub(crate) fn opt_long(&mut self, field: &'static str) -> Result<Option<i64>, ContractError> {
        match self.take_opt(field)? {
            None => Ok(None),
            Some(Value::Long(i)) => Ok(Some(i)),
            Some(Value::Int(i)) => Ok(Some(i64::from(i))),
            Some(v) => Err(self.wrong(field, "long or null", &v)),
        }
    }

    pub(crate) fn uuid(&mut self, field: &'static str) -> Result<Uuid, ContractError> {
        let v = self.take(field)?;
        self.uuid_of(field, v)
    }

    /// A uuid value (logical type, or its string form) of `field`.
    fn uuid_of(&self, field: &'static str, v: Value) -> Result<Uuid, ContractError> {
        match v {
            Value::Uuid(u) => Ok(u),
            Value::String(s) => Uuid::parse_str(&s).map_err(|_| ContractError::WrongType {
                record: self.record,
                field,
                expected: "uuid",
                found: "malformed uuid string".to_owned(),
            }),
            v => Err(self.wrong(field, "uuid", &v)),
        }
    }

    pub(crate) fn ts(&mut self, field: &'static str) -> Result<DateTime<Utc>, ContractError> {
        match self.take(field)? {
            Value::TimestampMicros(m) | Value::Long(m) => DateTime::from_timestamp_micros(m)
                .ok_or_else(|| ContractError::WrongType {
                    record: self.record,
                    field,
                    expected: "timestamp-micros in range",
                    found: m.to_string(),
                }),
            v => Err(self.wrong(field, "timestamp-micros", &v)),
        }
    }

    pub(crate) fn sealed(&mut self, field: &'static str) -> Result<Option<Sealed>, ContractError> {
        match self.take_opt(field)? {
            None => Ok(None),
            Some(Value::Bytes(b)) => Ok(Some(Sealed::from_bytes(b))),
            Some(v) => Err(self.wrong(field, "bytes or null", &v)),
        }
    }

    pub(crate) fn decimal(&mut self, field: &'static str) -> Result<Amount, ContractError> {
        match self.take(field)? {
            Value::Decimal(d) => {
                let bytes: Vec<u8> =
                    Vec::try_from(&d).map_err(|_| ContractError::DecimalOverflow {
                        record: self.record,
                        field,
                    })?;
                Amount::from_twos_complement(&bytes).ok_or(ContractError::DecimalOverflow {
                    record: self.record,
                    field,
                })
            }
            v => Err(self.wrong(field, "decimal", &v)),
        }
    }

    pub(crate) fn symbol<E: AvroEnum>(&mut self, field: &'static str) -> Result<E, ContractError> {
        match self.take(field)? {
            Value::Enum(_, sym) => E::SYMBOLS
                .iter()
                .position(|s| *s == sym)
                .map(|i| E::ALL[i])
                .ok_or(ContractError::UnknownSymbol {
                    record: self.record,
                    field,
                    symbol: sym,
                }),
            v => Err(self.wrong(field, "enum", &v)),
        }
    }

    pub(crate) fn record(
        &mut self,
        field: &'static str,
        name: &'static str,
    ) -> Result<Fields, ContractError> {
        let v = self.take(field)?;
        Fields::new(name, v)
    }

    pub(crate) fn array(&mut self, field: &'static str) -> Result<Vec<Value>, ContractError> {
        match self.take(field)? {
            Value::Array(items) => Ok(items),
            v => Err(self.wrong(field, "array", &v)),
        }
    }

    pub(crate) fn uuid_array(&mut self, field: &'static str) -> Result<Vec<Uuid>, ContractError> {
        self.array(field)?
            .into_iter()
            .map(|v| self.uuid_of(field, v))
            .collect()
    }

    pub(crate) fn bool(&mut self, field: &'static str) -> Result<bool, ContractError> {
        match self.take(field)? {
            Value::Boolean(b) => Ok(b),
            v => Err(self.wrong(field, "boolean", &v)),
        }
    }

    pub(crate) fn string_array(
        &mut self,
        field: &'static str,
    ) -> Result<Vec<String>, ContractError> {
        let items = self.array(field)?;
        items
            .into_iter()
            .map(|v| match v {
                Value::String(s) => Ok(s),
                other => Err(self.wrong(field, "array of strings", &other)),
            })
            .collect()
    }

    pub(crate) fn long_map(
        &mut self,
        field: &'static str,
    ) -> Result<std::collections::BTreeMap<String, i64>, ContractError> {
        match self.take(field)? {
            Value::Map(m) => {
                let mut out = std::collections::BTreeMap::new();
                for (k, v) in m {
                    match v {
                        Value::Long(n) => {
                            out.insert(k, n);
                        }
                        other => return Err(self.wrong(field, "map of longs", &other)),
                    }
                }
                Ok(out)
            }
            v => Err(self.wrong(field, "map", &v)),
        }
    }

    /// The branch index (in the reader schema) and value of a union field.
    pub(crate) fn branch(
        &mut self,
        field: &'static str,
        branches: usize,
    ) -> Result<(usize, Value), ContractError> {
        match self.take(field)? {
            Value::Union(i, inner) => {
                let i = i as usize;
                if i < branches {
                    Ok((i, *inner))
                } else {
                    Err(ContractError::UnknownBranch {
                        record: self.record,
                        branch: i.to_string(),
                    })
                }
            }
            v => Err(self.wrong(field, "union", &v)),
        }
    }
}
