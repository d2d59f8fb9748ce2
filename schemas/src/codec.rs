//! Avro single-object encoding: `C3 01`, the writer schema's 8-byte little-endian
//! CRC-64-AVRO fingerprint, then the Avro binary datum. Any Avro library can read it given
//! the `.avsc` files; no registry service is needed.

use std::io::Cursor;

use apache_avro::types::Value;

use crate::error::{CodecError, ContractError};
use crate::model::common::Envelope;
use crate::registry::SchemaSet;

/// The two marker bytes of the single-object encoding.
pub const MAGIC: [u8; 2] = [0xC3, 0x01];
/// Marker plus fingerprint.
pub const HEADER_LEN: usize = 10;

/// A top-level event of the contract: one schema, one topic family.
pub trait Contract: Sized + Send + Sync + 'static {
    /// The schema file stem, e.g. `customer-event`.
    const SCHEMA: &'static str;
    fn schema_set() -> &'static SchemaSet;
    fn envelope(&self) -> &Envelope;
    fn envelope_mut(&mut self) -> &mut Envelope;
    /// The dotted event type of the payload, e.g. `customer.identify`.
    fn event_type(&self) -> &'static str;
    /// Every field marked `"pii": true` in the schema, by field name: sealing and opening
    /// code works on these generically.
    fn pii_mut(&mut self) -> Vec<(&'static str, &mut Option<crate::model::common::Sealed>)>;
    #[doc(hidden)]
    fn to_value(&self, schema_version: i32) -> Value;
    #[doc(hidden)]
    fn from_value(v: Value) -> Result<Self, ContractError>;
}

/// Encodes an event with the current schema.
pub fn encode<E: Contract>(event: &E) -> Result<Vec<u8>, CodecError> {
    let set = E::schema_set();
    let current = set.current();
    let value = event.to_value(current.version);
    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&current.fingerprint.to_le_bytes());
    set.writer()
        .write_value_ref(&mut out, &value)
        .map_err(|e| CodecError::Avro {
            schema: E::SCHEMA,
            source: Box::new(e),
        })?;
    Ok(out)
}

/// The writer-schema fingerprint a framed record names, if it is framed at all.
pub fn fingerprint_of(bytes: &[u8]) -> Result<u64, CodecError> {
    if bytes.is_empty() {
        return Err(CodecError::Empty);
    }
    if bytes.len() < HEADER_LEN {
        return Err(CodecError::TooShort(bytes.len()));
    }
    if bytes[..2] != MAGIC {
        return Err(CodecError::BadMagic([bytes[0], bytes[1]]));
    }
    let mut fp = [0u8; 8];
    fp.copy_from_slice(&bytes[2..HEADER_LEN]);
    Ok(u64::from_le_bytes(fp))
}

/// Decodes a framed record written with any released version of `E`'s schema.
pub fn decode<E: Contract>(bytes: &[u8]) -> Result<E, CodecError> {
    decode_versioned(bytes).map(|(e, _)| e)
}

/// Like [`decode`], also returning the writer schema version.
pub fn decode_versioned<E: Contract>(bytes: &[u8]) -> Result<(E, i32), CodecError> {
    let set = E::schema_set();
    let fingerprint = fingerprint_of(bytes)?;
    let (reader, version) = match (set.reader(fingerprint), set.by_fingerprint(fingerprint)) {
        (Some(r), Some(v)) => (r, v.version),
        _ => {
            return Err(CodecError::UnknownFingerprint {
                schema: E::SCHEMA,
                fingerprint,
            })
        }
    };
    let body = &bytes[HEADER_LEN..];
    let mut cursor = Cursor::new(body);
    let value = reader
        .reader
        .read_value(&mut cursor)
        .map_err(|e| CodecError::Avro {
            schema: E::SCHEMA,
            source: Box::new(e),
        })?;
    let consumed = usize::try_from(cursor.position()).unwrap_or(usize::MAX);
    if consumed < body.len() {
        return Err(CodecError::TrailingBytes {
            schema: E::SCHEMA,
            trailing: body.len() - consumed,
        });
    }
    let value = if version == set.current().version {
        value
    } else {
        set.upgrade(reader, value)
            .map_err(|source| CodecError::Unresolvable {
                schema: E::SCHEMA,
                version,
                source,
            })?
    };
    let event = E::from_value(value).map_err(|source| CodecError::Contract {
        schema: E::SCHEMA,
        source,
    })?;
    Ok((event, version))
}

/// Implements [`Contract`] for a top-level `{ envelope, payload }` event.
macro_rules! contract {
    ($event:ident, $payload:ident, $schema:literal, $record:literal, $history:expr) => {
        impl $crate::codec::Contract for $event {
            const SCHEMA: &'static str = $schema;

            fn schema_set() -> &'static $crate::registry::SchemaSet {
                static SET: std::sync::LazyLock<$crate::registry::SchemaSet> =
                    std::sync::LazyLock::new(|| {
                        $crate::registry::SchemaSet::load(
                            $schema,
                            include_str!(concat!(
                                env!("CARGO_MANIFEST_DIR"),
                                "/avro/",
                                $schema,
                                ".avsc"
                            )),
                            $history,
                        )
                    });
                &SET
            }

            fn envelope(&self) -> &$crate::model::common::Envelope {
                &self.envelope
            }

            fn envelope_mut(&mut self) -> &mut $crate::model::common::Envelope {
                &mut self.envelope
            }

            fn event_type(&self) -> &'static str {
                self.payload.event_type()
            }

            fn pii_mut(
                &mut self,
            ) -> Vec<(&'static str, &mut Option<$crate::model::common::Sealed>)> {
                self.payload.pii_mut()
            }

            fn to_value(&self, schema_version: i32) -> apache_avro::types::Value {
                $crate::value::record(vec![
                    (
                        "envelope",
                        self.envelope
                            .to_value(self.payload.event_type(), schema_version),
                    ),
                    ("payload", self.payload.to_value()),
                ])
            }

            fn from_value(
                v: apache_avro::types::Value,
            ) -> Result<Self, $crate::error::ContractError> {
                let mut f = $crate::value::Fields::new($record, v)?;
                let (envelope, event_type, _version) =
                    $crate::model::common::Envelope::from_value(f.take("envelope")?)?;
                let (i, body) = f.branch("payload", $payload::BRANCHES)?;
                let payload = $payload::from_branch(i, body)?;
                if payload.event_type() != event_type {
                    return Err($crate::error::ContractError::EventTypeMismatch {
                        expected: payload.event_type(),
                        found: event_type,
                    });
                }
                Ok(Self { envelope, payload })
            }
        }
    };
}
pub(crate) use contract;
