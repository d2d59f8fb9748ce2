//! Where archive files live: names that depend only on (topic, partition, first offset and
//! the date of the first record), in a Hive-style layout query engines understand.
//!
//! `<prefix>/topic=<t>/partition=<p>/date=<yyyy-mm-dd>/<t>-<p>-<first offset, 20 digits>.avro`

use chrono::{DateTime, Utc};
use object_store::path::Path;

/// Zero-padding of offsets in names: every i64 offset fits, and names sort by offset.
const OFFSET_DIGITS: usize = 20;

/// An archive file's identity, parsed back from its name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct FileName {
    pub topic: String,
    pub partition: i32,
    pub first_offset: i64,
}

/// The directory of one topic (`None`: every topic) or one partition.
pub fn partition_dir(prefix: &Path, topic: &str, partition: Option<i32>) -> Path {
    let mut p = prefix.clone().join(format!("topic={topic}"));
    if let Some(partition) = partition {
        p = p.join(format!("partition={partition}"));
    }
    p
}

/// The object path of a file.
pub fn object_path(
    prefix: &Path,
    topic: &str,
    partition: i32,
    first_offset: i64,
    first_timestamp_ms: Option<i64>,
) -> Path {
    let date = first_timestamp_ms
        .and_then(DateTime::<Utc>::from_timestamp_millis)
        .unwrap_or(DateTime::<Utc>::UNIX_EPOCH)
        .format("%Y-%m-%d");
    partition_dir(prefix, topic, Some(partition))
        .join(format!("date={date}"))
        .join(format!(
            "{topic}-{partition}-{first_offset:0width$}.avro",
            width = OFFSET_DIGITS
        ))
}

/// Parses a file name (the last path segment); other objects (temporary files, a user's
/// notes) are not archive files.
pub fn parse(path: &Path) -> Option<FileName> {
    let name = path.filename()?;
    let stem = name.strip_suffix(".avro")?;
    let (rest, offset) = stem.rsplit_once('-')?;
    let (topic, partition) = rest.rsplit_once('-')?;
    if offset.len() != OFFSET_DIGITS || topic.is_empty() {
        return None;
    }
    Some(FileName {
        topic: topic.to_owned(),
        partition: partition.parse().ok()?,
        first_offset: offset.parse().ok()?,
    })
}

/// Partitions present under a topic directory, from `partition=<p>` segments.
pub fn partition_of_dir(path: &Path) -> Option<i32> {
    path.parts()
        .filter_map(|p| {
            p.as_ref()
                .strip_prefix("partition=")
                .and_then(|v| v.parse().ok())
        })
        .next_back()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_deterministic_and_parse_back() {
        let prefix = Path::from("archive/v1");
        let p = object_path(
            &prefix,
            "cdp.customer-events",
            4,
            123,
            Some(1_763_812_800_000),
        );
        assert_eq!(
            p.as_ref(),
            "archive/v1/topic=cdp.customer-events/partition=4/date=2025-11-22/cdp.customer-events-4-00000000000000000123.avro"
        );
        assert_eq!(
            parse(&p),
            Some(FileName {
                topic: "cdp.customer-events".into(),
                partition: 4,
                first_offset: 123
            })
        );
        assert_eq!(partition_of_dir(&p), Some(4));
    }

    #[test]
    fn names_sort_by_offset() {
        let prefix = Path::from("a");
        let small = object_path(&prefix, "t", 0, 9, Some(0));
        let big = object_path(&prefix, "t", 0, 10, Some(0));
        assert!(small.filename() < big.filename());
    }

    #[test]
    fn a_record_without_timestamp_files_under_the_epoch() {
        let p = object_path(&Path::from("a"), "t", 0, 0, None);
        assert!(p.as_ref().contains("date=1970-01-01"), "{p}");
    }

    #[test]
    fn other_objects_are_not_archive_files() {
        for name in [
            "a/b/notes.txt",
            "a/t-0-12.avro",
            "a/-0-00000000000000000001.avro",
            "a/t-x-00000000000000000001.avro",
        ] {
            assert_eq!(parse(&Path::from(name)), None, "{name}");
        }
    }
}
