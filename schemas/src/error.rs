use thiserror::Error;

/// A datum that is valid Avro but does not fit the typed contract.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ContractError {
    #[error("{record}: expected a record, found {found}")]
    NotARecord { record: &'static str, found: String },
    #[error("{record}.{field}: field is missing")]
    MissingField {
        record: &'static str,
        field: &'static str,
    },
    #[error("{record}.{field}: expected {expected}, found {found}")]
    WrongType {
        record: &'static str,
        field: &'static str,
        expected: &'static str,
        found: String,
    },
    #[error("{record}.{field}: unknown enum symbol `{symbol}`")]
    UnknownSymbol {
        record: &'static str,
        field: &'static str,
        symbol: String,
    },
    #[error("{record}.payload: unknown branch `{branch}`")]
    UnknownBranch {
        record: &'static str,
        branch: String,
    },
    #[error("envelope.event_type is `{found}` but the payload is `{expected}`")]
    EventTypeMismatch {
        expected: &'static str,
        found: String,
    },
    #[error("{record}.{field}: decimal does not fit in 128 bits")]
    DecimalOverflow {
        record: &'static str,
        field: &'static str,
    },
}

/// Why bytes could not be turned into a typed event (or an event into bytes).
#[derive(Debug, Error)]
pub enum CodecError {
    #[error("record has no value (tombstone)")]
    Empty,
    #[error("record is {0} bytes, shorter than the 10-byte single-object header")]
    TooShort(usize),
    #[error("bad single-object marker {0:02x?}, expected [c3, 01]")]
    BadMagic([u8; 2]),
    #[error("unknown writer schema fingerprint {fingerprint:016x} for {schema}")]
    UnknownFingerprint {
        schema: &'static str,
        fingerprint: u64,
    },
    #[error("corrupt Avro body for {schema}")]
    Avro {
        schema: &'static str,
        #[source]
        source: Box<apache_avro::Error>,
    },
    #[error("{trailing} trailing bytes after the Avro datum of {schema}")]
    TrailingBytes {
        schema: &'static str,
        trailing: usize,
    },
    #[error("a datum of {schema} v{version} does not resolve to the current schema")]
    Unresolvable {
        schema: &'static str,
        version: i32,
        #[source]
        source: crate::resolve::ResolveError,
    },
    #[error("datum does not fit the {schema} contract")]
    Contract {
        schema: &'static str,
        #[source]
        source: ContractError,
    },
}

impl CodecError {
    /// A short, stable, low-cardinality name of the failure, for metrics and DLQ headers.
    pub fn kind(&self) -> &'static str {
        match self {
            CodecError::Empty => "empty",
            CodecError::TooShort(_) => "too_short",
            CodecError::BadMagic(_) => "bad_magic",
            CodecError::UnknownFingerprint { .. } => "unknown_fingerprint",
            CodecError::Avro { .. } => "corrupt_avro",
            CodecError::TrailingBytes { .. } => "trailing_bytes",
            CodecError::Unresolvable { .. } => "unresolvable",
            CodecError::Contract { .. } => "contract",
        }
    }
}
