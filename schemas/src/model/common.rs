//! The envelope every event carries, and the value types shared by all topics.

use apache_avro::types::Value;
use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::error::ContractError;
use crate::value::{self, avro_enum, AvroEnum, Fields};

/// Metadata every CDP event carries.
///
/// `event_type` and `schema_version` are on the wire too, but derived: the type from the
/// payload variant, the version from the writer schema.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    /// Globally unique; the unit of dedup everywhere.
    pub event_id: Uuid,
    pub occurred_at: DateTime<Utc>,
    pub received_at: DateTime<Utc>,
    pub source: String,
    pub subject: Subject,
    /// The Kafka record key.
    pub partition_key: String,
}

/// Whom an event is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subject {
    /// The subject's token (of its user id, else its anonymous id, else its first
    /// identifier). Names the data key that seals the event's PII.
    pub subject_id: String,
    pub identifiers: Vec<Identifier>,
}

/// One identifier, as the identifier vault's token for its normalized value.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Identifier {
    pub kind: IdentifierKind,
    /// The issuing system, for [`IdentifierKind::ExternalId`].
    pub namespace: Option<String>,
    /// The vault's random token (32 lower-case hex characters); it stands for the identifier
    /// only through its vault row, which erasure deletes.
    pub token: String,
}

avro_enum! {
    /// The kinds of identifier identity resolution links.
    #[derive(PartialOrd, Ord)]
    pub enum IdentifierKind {
        UserId = "USER_ID",
        AnonymousId = "ANONYMOUS_ID",
        Email = "EMAIL",
        Phone = "PHONE",
        DeviceId = "DEVICE_ID",
        ExternalId = "EXTERNAL_ID",
    }
}

/// PII sealed with the subject's data key (AES-256-GCM); opaque to the contract.
///
/// Fields of this type are the ones marked `"pii": true` in the schemas. Destroying the
/// subject's key makes every copy unreadable: in Kafka, in archives and in replays.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Sealed(Vec<u8>);

impl Sealed {
    pub fn from_bytes(bytes: Vec<u8>) -> Self {
        Self(bytes)
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    pub fn into_bytes(self) -> Vec<u8> {
        self.0
    }
}

impl std::fmt::Debug for Sealed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Sealed({} bytes)", self.0.len())
    }
}

/// A money amount with four decimal places: Avro `decimal(18, 4)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Amount {
    /// The amount times 10^4.
    ten_thousandths: i128,
}

/// Why a decimal string is not an [`Amount`].
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("`{0}` is not a decimal amount with at most 4 decimal places and 14 integer digits")]
pub struct AmountParseError(pub String);

impl Amount {
    pub const SCALE: u32 = 4;
    const PRECISION: u32 = 18;

    pub fn from_ten_thousandths(v: i128) -> Option<Self> {
        (v.unsigned_abs() < 10u128.pow(Self::PRECISION)).then_some(Self { ten_thousandths: v })
    }

    pub const fn zero() -> Self {
        Self { ten_thousandths: 0 }
    }

    pub fn ten_thousandths(self) -> i128 {
        self.ten_thousandths
    }

    /// Big-endian two's complement, minimal length (the Avro decimal encoding).
    pub(crate) fn to_twos_complement(self) -> Vec<u8> {
        let bytes = self.ten_thousandths.to_be_bytes();
        let mut start = 0;
        while start < bytes.len() - 1 {
            let (b, next) = (bytes[start], bytes[start + 1]);
            let redundant = (b == 0x00 && next & 0x80 == 0) || (b == 0xff && next & 0x80 != 0);
            if !redundant {
                break;
            }
            start += 1;
        }
        bytes[start..].to_vec()
    }

    pub(crate) fn from_twos_complement(bytes: &[u8]) -> Option<Self> {
        if bytes.is_empty() || bytes.len() > 16 {
            return None;
        }
        let fill = if bytes[0] & 0x80 != 0 { 0xff } else { 0x00 };
        let mut buf = [fill; 16];
        buf[16 - bytes.len()..].copy_from_slice(bytes);
        Self::from_ten_thousandths(i128::from_be_bytes(buf))
    }
}

impl std::str::FromStr for Amount {
    type Err = AmountParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || AmountParseError(s.to_owned());
        let t = s.trim();
        let (neg, digits) = match t.strip_prefix('-') {
            Some(rest) => (true, rest),
            None => (false, t.strip_prefix('+').unwrap_or(t)),
        };
        let (int, frac) = digits.split_once('.').unwrap_or((digits, ""));
        let all_digits = |x: &str| x.bytes().all(|b| b.is_ascii_digit());
        if int.is_empty()
            || int.len() > 14
            || frac.len() > 4
            || !all_digits(int)
            || !all_digits(frac)
        {
            return Err(err());
        }
        let int_v: i128 = int.parse().map_err(|_| err())?;
        let frac_v: i128 = if frac.is_empty() {
            0
        } else {
            let f: i128 = frac.parse().map_err(|_| err())?;
            f * 10i128.pow(4 - frac.len() as u32)
        };
        let v = int_v * 10_000 + frac_v;
        Self::from_ten_thousandths(if neg { -v } else { v }).ok_or_else(err)
    }
}

impl std::fmt::Display for Amount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let sign = if self.ten_thousandths < 0 { "-" } else { "" };
        let abs = self.ten_thousandths.unsigned_abs();
        write!(f, "{sign}{}.{:04}", abs / 10_000, abs % 10_000)
    }
}

impl Envelope {
    /// The tokens the envelope names: its subject's and its identifiers'.
    pub fn tokens(&self) -> impl Iterator<Item = &str> {
        std::iter::once(self.subject.subject_id.as_str())
            .chain(self.subject.identifiers.iter().map(|i| i.token.as_str()))
            .filter(|t| !t.is_empty())
    }

    pub(crate) fn to_value(&self, event_type: &str, schema_version: i32) -> Value {
        value::record(vec![
            ("event_id", value::uuid(&self.event_id)),
            ("event_type", value::string(event_type)),
            ("schema_version", Value::Int(schema_version)),
            ("occurred_at", value::ts(&self.occurred_at)),
            ("received_at", value::ts(&self.received_at)),
            ("source", value::string(&self.source)),
            ("subject", self.subject.to_value()),
            ("partition_key", value::string(&self.partition_key)),
        ])
    }

    /// The envelope, and the event type and schema version written with it.
    pub(crate) fn from_value(v: Value) -> Result<(Self, String, i32), ContractError> {
        let mut f = Fields::new("Envelope", v)?;
        let event_id = f.uuid("event_id")?;
        let event_type = f.string("event_type")?;
        let schema_version = f.int("schema_version")?;
        let envelope = Self {
            event_id,
            occurred_at: f.ts("occurred_at")?,
            received_at: f.ts("received_at")?,
            source: f.string("source")?,
            subject: Subject::from_fields(f.record("subject", "Subject")?)?,
            partition_key: f.string("partition_key")?,
        };
        Ok((envelope, event_type, schema_version))
    }
}

impl Subject {
    fn to_value(&self) -> Value {
        value::record(vec![
            ("subject_id", value::string(&self.subject_id)),
            (
                "identifiers",
                Value::Array(self.identifiers.iter().map(Identifier::to_value).collect()),
            ),
        ])
    }

    fn from_fields(mut f: Fields) -> Result<Self, ContractError> {
        Ok(Self {
            subject_id: f.string("subject_id")?,
            identifiers: f
                .array("identifiers")?
                .into_iter()
                .map(|v| Identifier::from_fields(Fields::new("Identifier", v)?))
                .collect::<Result<_, _>>()?,
        })
    }
}

impl Identifier {
    pub(crate) fn to_value(&self) -> Value {
        value::record(vec![
            ("kind", self.kind.to_value()),
            ("namespace", value::opt_string(&self.namespace)),
            ("token", value::string(&self.token)),
        ])
    }

    pub(crate) fn from_fields(mut f: Fields) -> Result<Self, ContractError> {
        Ok(Self {
            kind: f.symbol("kind")?,
            namespace: f.opt_string("namespace")?,
            token: f.string("token")?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn amount_parses_and_prints() {
        for (s, want) in [
            ("12.34", "12.3400"),
            ("-0.5", "-0.5000"),
            ("7", "7.0000"),
            ("0.0001", "0.0001"),
        ] {
            let a: Amount = s.parse().expect("valid amount");
            assert_eq!(a.to_string(), want);
        }
        for bad in ["", "1.23456", "abc", "1e5", "--1", "123456789012345"] {
            assert!(bad.parse::<Amount>().is_err(), "{bad} should not parse");
        }
    }

    #[test]
    fn amount_twos_complement_round_trips() {
        for v in [
            0i128,
            1,
            -1,
            127,
            128,
            -128,
            -129,
            255,
            65_535,
            -65_536,
            999_999_999_999_999_999,
        ] {
            let a = Amount::from_ten_thousandths(v).expect("in range");
            let bytes = a.to_twos_complement();
            assert_eq!(
                Amount::from_twos_complement(&bytes),
                Some(a),
                "{v}: {bytes:02x?}"
            );
        }
        assert_eq!(
            Amount::from_ten_thousandths(1).map(|a| a.to_twos_complement()),
            Some(vec![1])
        );
        assert_eq!(
            Amount::from_ten_thousandths(-1).map(|a| a.to_twos_complement()),
            Some(vec![0xff])
        );
        assert_eq!(
            Amount::from_ten_thousandths(128).map(|a| a.to_twos_complement()),
            Some(vec![0, 0x80])
        );
    }
}
