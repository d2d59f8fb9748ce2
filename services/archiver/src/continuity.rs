//! The archive's continuity: a partition's records are archived with no offset twice (on
//! every topic) and none missing (on delete-policy topics).
//!
//! On a delete-policy topic, offsets are dense: a record arriving above the next offset to
//! archive means the records in between are gone from the log (its start moved past the
//! archive: retention, `DeleteRecords`, a topic recreated) before they were archived. The
//! archiver stops with [`ContinuityError::Gap`], naming the partition and the range, until an
//! operator acknowledges exactly that loss (`CDP_ARCHIVE_ACKNOWLEDGED_GAPS`). An acknowledged
//! gap lies between two files, and the file after it says so in its header
//! ([`crate::ocf::meta::GAP_BEFORE`]), so the archive describes its own holes.
//!
//! An archive ahead of the log (its next offset past the partition's end: the topic was
//! created again, or the broker lost records) stops the archiver too: the new log's records
//! at offsets the archive already holds would otherwise be skipped as archived.
//!
//! Compacted topics have holes by design (the cleaner removes superseded records): only
//! overlaps are refused there. Topics written by transactional producers also have holes,
//! one offset per commit marker; acknowledge them, or archive such topics as compacted
//! ([`Continuity::new`] takes the policies the broker reports).

use std::collections::HashMap;
use std::str::FromStr;

use cdp_runtime::topics::Cleanup;

/// An operator's acknowledgement that offsets `from..=to` of a partition are lost to the
/// archive. Written `topic:partition:from-to`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AcknowledgedGap {
    pub topic: String,
    pub partition: i32,
    pub from: i64,
    pub to: i64,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("acknowledged gap {0:?} is not topic:partition:from-to")]
pub struct GapSyntaxError(pub String);

impl FromStr for AcknowledgedGap {
    type Err = GapSyntaxError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || GapSyntaxError(s.to_owned());
        let (rest, range) = s.trim().rsplit_once(':').ok_or_else(bad)?;
        let (topic, partition) = rest.rsplit_once(':').ok_or_else(bad)?;
        let (from, to) = range.split_once('-').ok_or_else(bad)?;
        let gap = AcknowledgedGap {
            topic: topic.to_owned(),
            partition: partition.parse().map_err(|_| bad())?,
            from: from.parse().map_err(|_| bad())?,
            to: to.parse().map_err(|_| bad())?,
        };
        if gap.topic.is_empty() || gap.from < 0 || gap.to < gap.from {
            return Err(bad());
        }
        Ok(gap)
    }
}

impl std::fmt::Display for AcknowledgedGap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}:{}:{}-{}",
            self.topic, self.partition, self.from, self.to
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ContinuityError {
    #[error(
        "partition {} of {}: offsets {}..={} are no longer in the log and were never archived \
         (the log start moved past the archive); the archiver stops rather than leave a silent \
         hole. To archive on without them, acknowledge the loss: \
         CDP_ARCHIVE_ACKNOWLEDGED_GAPS={}",
        .0.partition, .0.topic, .0.from, .0.to, .0
    )]
    Gap(AcknowledgedGap),
    #[error(
        "partition {partition} of {topic}: archive files {previous} and {next} overlap (offset \
         {first} is archived twice); the archiver does not write after an overlap: keep one of \
         the files (see docs/archive.md)"
    )]
    Overlap {
        topic: String,
        partition: i32,
        previous: String,
        next: String,
        first: i64,
    },
    #[error(
        "partition {partition} of {topic}: the archive holds offsets up to {archived} but the \
         log ends at {end}: the topic was deleted and created again, or the broker lost \
         records. The archiver stops rather than take the new log's records for archived \
         ones; archive the new topic under another prefix or restore the old one (cdp restore)"
    )]
    AheadOfLog {
        topic: String,
        partition: i32,
        archived: i64,
        end: i64,
    },
    #[error(
        "partition {partition} of {topic}: archive files {previous} and {next} leave offsets \
         {from}..={to} out, and no acknowledged gap says so"
    )]
    FileGap {
        topic: String,
        partition: i32,
        previous: String,
        next: String,
        from: i64,
        to: i64,
    },
}

/// What the archiver knows about each topic's continuity.
#[derive(Clone, Debug, Default)]
pub struct Continuity {
    compacted: HashMap<String, bool>,
    acknowledged: Vec<AcknowledgedGap>,
}

/// A hole between the next offset to archive and the record that came.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Hole {
    /// Allowed by design (compacted topic).
    Compacted,
    /// Lost to the archive with the operator's acknowledgement.
    Acknowledged(AcknowledgedGap),
}

impl Continuity {
    pub fn new(policies: HashMap<String, Cleanup>, acknowledged: Vec<AcknowledgedGap>) -> Self {
        Self {
            compacted: policies
                .into_iter()
                .map(|(t, c)| (t, c == Cleanup::Compact))
                .collect(),
            acknowledged,
        }
    }

    pub fn is_compacted(&self, topic: &str) -> bool {
        self.compacted.get(topic).copied().unwrap_or(false)
    }

    /// Judges the hole `next..record` (record > next) in a partition.
    pub fn hole(
        &self,
        topic: &str,
        partition: i32,
        next: i64,
        record: i64,
    ) -> Result<Hole, ContinuityError> {
        if self.is_compacted(topic) {
            return Ok(Hole::Compacted);
        }
        let gap = AcknowledgedGap {
            topic: topic.to_owned(),
            partition,
            from: next,
            to: record - 1,
        };
        let covered = self.acknowledged.iter().any(|a| {
            a.topic == gap.topic
                && a.partition == gap.partition
                && a.from <= gap.from
                && gap.to <= a.to
        });
        if covered {
            Ok(Hole::Acknowledged(gap))
        } else {
            Err(ContinuityError::Gap(gap))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acknowledgements_parse_and_print_back() {
        let g: AcknowledgedGap = "cdp.customer-events:3:100-199".parse().unwrap_or_else(|e| {
            panic!("{e}");
        });
        assert_eq!(
            g,
            AcknowledgedGap {
                topic: "cdp.customer-events".into(),
                partition: 3,
                from: 100,
                to: 199
            }
        );
        assert_eq!(g.to_string(), "cdp.customer-events:3:100-199");
        for bad in ["t:1:5", "t:x:1-2", ":1:1-2", "t:1:9-2", "t:1:-1-2"] {
            assert!(bad.parse::<AcknowledgedGap>().is_err(), "{bad}");
        }
    }

    #[test]
    fn a_hole_stops_the_archiver_unless_acknowledged_or_compacted() {
        let policies = HashMap::from([
            ("events".to_owned(), Cleanup::Delete),
            ("snapshots".to_owned(), Cleanup::Compact),
        ]);
        let ack = "events:2:100-299".parse().ok().into_iter().collect();
        let c = Continuity::new(policies, ack);
        assert_eq!(
            c.hole("snapshots", 0, 5, 9).ok(),
            Some(Hole::Compacted),
            "compaction leaves holes"
        );
        assert!(matches!(
            c.hole("events", 2, 150, 200),
            Ok(Hole::Acknowledged(g)) if (g.from, g.to) == (150, 199)
        ));
        let err = c.hole("events", 2, 250, 400).err().map(|e| e.to_string());
        assert!(
            err.as_deref()
                .is_some_and(|e| e.contains("offsets 250..=399")
                    && e.contains("CDP_ARCHIVE_ACKNOWLEDGED_GAPS=events:2:250-399")),
            "{err:?}"
        );
        assert!(c.hole("events", 1, 150, 200).is_err(), "another partition");
        assert!(
            c.hole("unknown", 0, 1, 3).is_err(),
            "a topic of unknown policy is held to delete's rule"
        );
    }
}
