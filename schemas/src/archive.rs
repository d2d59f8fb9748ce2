//! The archive file format: what the archiver writes into Avro Object Container Files.
//!
//! Not an event: a storage contract for whoever reads the archive (Spark, Athena, DuckDB,
//! fastavro, `cdp restore`). Each datum is one Kafka record, its value untouched.

/// The `ArchivedRecord` schema (JSON), embedded in every archive file's header.
pub const ARCHIVED_RECORD_SCHEMA: &str = include_str!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/avro/archive/archived-record.avsc"
));

/// The field order the binary encoding follows (Avro encodes record fields in schema order).
pub const ARCHIVED_RECORD_FIELDS: [&str; 7] = [
    "topic",
    "partition",
    "offset",
    "timestamp",
    "key",
    "value",
    "headers",
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_archive_schema_parses_and_lists_its_fields_in_encoding_order() {
        let schema = apache_avro::Schema::parse_str(ARCHIVED_RECORD_SCHEMA).expect("valid schema");
        let apache_avro::Schema::Record(record) = schema else {
            panic!("a record schema");
        };
        let names: Vec<&str> = record.fields.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(names, ARCHIVED_RECORD_FIELDS);
    }
}
