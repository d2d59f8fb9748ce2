//! Every released version of every schema, parsed once, indexed by fingerprint.

use std::collections::HashMap;

use apache_avro::rabin::Rabin;
use apache_avro::reader::datum::GenericDatumReader;
use apache_avro::schema::ResolvedSchema;
use apache_avro::types::Value;
use apache_avro::writer::datum::GenericDatumWriter;
use apache_avro::Schema;

use crate::resolve::{resolve, Names, ResolveError};

/// Records larger than this are refused by the decoder before it allocates for them
/// (Kafka's default max message size is 1 MB; a corrupt length prefix must not cost more).
pub const MAX_ALLOCATION_BYTES: usize = 16 * 1024 * 1024;

/// One released version of a schema.
pub struct SchemaVersion {
    pub version: i32,
    /// CRC-64-AVRO (Rabin) fingerprint of the specification's Parsing Canonical Form: what
    /// the single-object header carries and what any other Avro implementation computes.
    pub fingerprint: u64,
    /// The fingerprint records written before 2026-12 carry for the same schema (the Rabin
    /// fingerprint of the `apache-avro` crate's canonical form, which keeps logical types and
    /// a decimal's precision and scale). Read as an alias of [`Self::fingerprint`]; never
    /// written.
    pub legacy_fingerprint: u64,
    pub schema: &'static Schema,
    /// The `.avsc` text.
    pub source: &'static str,
}

/// A schema (one per topic family) with its released history.
/// How data of one released version is read.
pub(crate) struct Writer {
    pub(crate) reader: GenericDatumReader<'static>,
    schema: &'static Schema,
    names: ResolvedSchema<'static>,
}

pub struct SchemaSet {
    pub name: &'static str,
    versions: Vec<SchemaVersion>,
    current: usize,
    /// By fingerprint: a reader of the writer's datum (no resolution) and the writer schema
    /// as the current schema's field aliases name its fields.
    readers: HashMap<u64, Writer>,
    writer: GenericDatumWriter<'static>,
    names: ResolvedSchema<'static>,
}

/// The `apache-avro` crate's fingerprint of a parsed schema (see
/// [`SchemaVersion::legacy_fingerprint`]).
pub fn legacy_fingerprint(schema: &Schema) -> u64 {
    let fp = schema.fingerprint::<Rabin>();
    let mut le = [0u8; 8];
    for (dst, src) in le.iter_mut().zip(fp.bytes.iter()) {
        *dst = *src;
    }
    u64::from_le_bytes(le)
}

/// The specification's fingerprint of an embedded schema text.
fn spec_fingerprint(name: &str, source: &str) -> u64 {
    // Every embedded source has a canonical form (the unit tests compute them all).
    crate::canonical::fingerprint(source)
        .unwrap_or_else(|e| panic!("embedded schema {name} has no canonical form: {e}"))
}

fn parse(name: &str, source: &str) -> &'static Schema {
    // The sources are compiled into the binary and every one is parsed by the unit tests,
    // so a failure here is a build defect, not an input error.
    let schema = Schema::parse_str(source)
        .unwrap_or_else(|e| panic!("embedded schema {name} does not parse: {e}"));
    Box::leak(Box::new(schema))
}

impl SchemaSet {
    /// `history` lists every released version (1, 2, ...); `current` is the schema the code
    /// writes. If `current` matches no released version it is treated as the next, unreleased
    /// one (a unit test refuses that state, so it never ships).
    pub(crate) fn load(
        name: &'static str,
        current: &'static str,
        history: &[(i32, &'static str)],
    ) -> Self {
        apache_avro::util::max_allocation_bytes(MAX_ALLOCATION_BYTES);
        let mut versions: Vec<SchemaVersion> = history
            .iter()
            .map(|(version, source)| {
                let schema = parse(name, source);
                SchemaVersion {
                    version: *version,
                    fingerprint: spec_fingerprint(name, source),
                    legacy_fingerprint: legacy_fingerprint(schema),
                    schema,
                    source,
                }
            })
            .collect();
        let current_schema = parse(name, current);
        let current_fp = spec_fingerprint(name, current);
        let current = match versions.iter().position(|v| v.fingerprint == current_fp) {
            Some(i) => i,
            None => {
                let next = versions.iter().map(|v| v.version).max().unwrap_or(0) + 1;
                versions.push(SchemaVersion {
                    version: next,
                    fingerprint: current_fp,
                    legacy_fingerprint: legacy_fingerprint(current_schema),
                    schema: current_schema,
                    source: current,
                });
                versions.len() - 1
            }
        };
        let reader_schema = versions[current].schema;
        let reader_source = versions[current].source;
        let readers = versions
            .iter()
            .flat_map(|v| {
                let renamed = crate::aliases::apply_field_aliases(v.source, reader_source);
                let writer = if renamed == v.source {
                    v.schema
                } else {
                    parse(name, &renamed)
                };
                let reader = || {
                    let fail = |e: apache_avro::Error| -> ! {
                        panic!("schema {name} v{} cannot be read: {e}", v.version)
                    };
                    Writer {
                        reader: GenericDatumReader::builder(writer)
                            .build()
                            .unwrap_or_else(|e| fail(e)),
                        schema: writer,
                        names: ResolvedSchema::new(writer).unwrap_or_else(|e| fail(e)),
                    }
                };
                // Records carrying the legacy fingerprint are read by the same version.
                [(v.fingerprint, reader()), (v.legacy_fingerprint, reader())]
            })
            .collect();
        let names = ResolvedSchema::new(reader_schema)
            .unwrap_or_else(|e| panic!("schema {name} has unresolvable names: {e}"));
        let writer = GenericDatumWriter::builder(reader_schema)
            .build()
            .unwrap_or_else(|e| panic!("schema {name} cannot be written: {e}"));
        Self {
            name,
            versions,
            current,
            readers,
            writer,
            names,
        }
    }

    pub fn current(&self) -> &SchemaVersion {
        &self.versions[self.current]
    }

    /// Every known version, oldest first (the current one included).
    pub fn versions(&self) -> &[SchemaVersion] {
        &self.versions
    }

    /// The version a fingerprint names: the specification's, or the legacy alias.
    pub fn by_fingerprint(&self, fingerprint: u64) -> Option<&SchemaVersion> {
        self.versions
            .iter()
            .find(|v| v.fingerprint == fingerprint || v.legacy_fingerprint == fingerprint)
    }

    pub(crate) fn reader(&self, fingerprint: u64) -> Option<&Writer> {
        self.readers.get(&fingerprint)
    }

    /// A datum of an older version, decoded with its writer schema, as the current schema
    /// reads it ([`crate::resolve`]).
    pub(crate) fn upgrade(&self, writer: &Writer, value: Value) -> Result<Value, ResolveError> {
        let names = Names {
            writer: writer.names.get_names(),
            reader: self.names.get_names(),
        };
        resolve(value, writer.schema, self.current().schema, &names)
    }

    pub(crate) fn writer(&self) -> &GenericDatumWriter<'static> {
        &self.writer
    }
}
