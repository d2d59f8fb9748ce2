//! Where one archive file ends and the next begins.
//!
//! Every rule that fires while records flow depends only on the records (their count, their
//! encoded size, their timestamps), never on batch boundaries or timing, so two attempts
//! that start a file at the same offset cut it at the same offset and write the same
//! object. A file is closed when:
//!
//! - it holds `max_records` records, or adding the next record would pass `max_bytes`;
//! - the next record's timestamp falls in a later time window (windows of `window_ms`
//!   aligned to the epoch, the window being that of the file's first record);
//! - at the tail of the log: the file's window has ended more than `grace` ago by the
//!   wall clock *and* its partition has been quiet for `grace`. This is the one rule that
//!   involves time; a record could only land in a different file if it arrived with a
//!   timestamp inside a window that ended more than `grace` before it arrived;
//! - under memory pressure: when the process holds more than its budget of buffered bytes
//!   over all partitions, the sink closes the largest open files early (see
//!   [`crate::sink`]). Such a cut depends on the process, not the records; it changes file
//!   sizes, never continuity.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use cdp_runtime::RawRecord;

use crate::ocf::{self, meta, Codec, FileWriter, OcfError};

#[derive(Clone, Copy, Debug)]
pub struct CutPolicy {
    pub max_records: u64,
    pub max_bytes: u64,
    pub window_ms: i64,
    pub grace: Duration,
}

impl CutPolicy {
    fn window_of(&self, timestamp_ms: i64) -> i64 {
        timestamp_ms.div_euclid(self.window_ms.max(1))
    }
}

/// Key, value and header bytes of a record: what `max_bytes` counts.
fn payload_size(r: &RawRecord) -> u64 {
    let headers: usize = r
        .headers
        .iter()
        .map(|(k, v)| k.len() + v.map_or(0, <[u8]>::len))
        .sum();
    (r.key.as_ref().map_or(0, |k| k.len()) + r.value.as_ref().map_or(0, |v| v.len()) + headers)
        as u64
}

/// A file being filled for one partition.
#[derive(Debug)]
pub struct OpenFile {
    pub topic: String,
    pub partition: i32,
    pub first_offset: i64,
    pub last_offset: i64,
    pub first_timestamp_ms: Option<i64>,
    /// The window (index) of the first record that had a timestamp.
    window: Option<i64>,
    min_timestamp_ms: Option<i64>,
    max_timestamp_ms: Option<i64>,
    pub records: u64,
    pub bytes: u64,
    /// Offsets lost right before this file, acknowledged by an operator.
    pub gap_before: Option<(i64, i64)>,
    last_append: Instant,
    writer: FileWriter,
}

/// A closed file, ready to upload. Its bytes are produced by [`SealedFile::encoded`]
/// (compression), which the archiver runs off the consuming thread.
#[derive(Debug)]
pub struct SealedFile {
    pub topic: String,
    pub partition: i32,
    pub first_offset: i64,
    pub last_offset: i64,
    pub first_timestamp_ms: Option<i64>,
    pub records: u64,
    /// Key, value and header bytes held (what the memory budget counts).
    pub bytes: u64,
    body: Body,
}

#[derive(Debug)]
enum Body {
    Pending {
        writer: FileWriter,
        metadata: BTreeMap<String, String>,
    },
    Encoded(bytes::Bytes),
}

impl SealedFile {
    /// The file's bytes (compressing it the first time), with the file to keep for a retry.
    /// CPU-bound: run it on a blocking thread.
    pub fn encoded(self) -> Result<(SealedFile, bytes::Bytes), OcfError> {
        let bytes = match self.body {
            Body::Pending { writer, metadata } => bytes::Bytes::from(writer.finish(&metadata)?),
            Body::Encoded(b) => b,
        };
        let file = SealedFile {
            body: Body::Encoded(bytes.clone()),
            ..self
        };
        Ok((file, bytes))
    }
}

/// Adds `r` to a partition's open file (starting one when there is none). When `r` must
/// start a new file, the open one is sealed first and returned.
pub fn add(
    open: &mut Option<OpenFile>,
    r: &RawRecord,
    policy: &CutPolicy,
    codec: Codec,
    now: Instant,
) -> Option<SealedFile> {
    let size = payload_size(r);
    let sealed = if open
        .as_ref()
        .is_some_and(|f| f.must_close_before(r, size, policy))
    {
        open.take().map(OpenFile::seal)
    } else {
        None
    };
    open.get_or_insert_with(|| OpenFile::start(r, codec))
        .append(r, size, policy, now);
    sealed
}

impl OpenFile {
    fn start(first: &RawRecord, codec: Codec) -> Self {
        Self {
            topic: first.topic.to_string(),
            partition: first.partition,
            first_offset: first.offset,
            last_offset: first.offset,
            first_timestamp_ms: first.timestamp_ms,
            window: None,
            min_timestamp_ms: None,
            max_timestamp_ms: None,
            records: 0,
            bytes: 0,
            gap_before: None,
            last_append: Instant::now(),
            writer: FileWriter::new(
                codec,
                ocf::sync_marker(&first.topic, first.partition, first.offset),
            ),
        }
    }

    /// Whether `next`, of payload `size`, must go into a new file.
    fn must_close_before(&self, next: &RawRecord, size: u64, policy: &CutPolicy) -> bool {
        if self.records >= policy.max_records {
            return true;
        }
        if self.records > 0 && self.bytes + size > policy.max_bytes {
            return true;
        }
        match (self.window, next.timestamp_ms) {
            (Some(w), Some(t)) => policy.window_of(t) > w,
            _ => false,
        }
    }

    /// Appends a record of payload `size`; `now` is when its batch is applied (one clock
    /// read per batch).
    fn append(&mut self, r: &RawRecord, size: u64, policy: &CutPolicy, now: Instant) {
        self.writer.append(r);
        self.bytes += size;
        self.records += 1;
        self.last_offset = r.offset;
        self.last_append = now;
        if let Some(t) = r.timestamp_ms {
            if self.window.is_none() {
                self.window = Some(policy.window_of(t));
            }
            self.min_timestamp_ms = Some(self.min_timestamp_ms.map_or(t, |m| m.min(t)));
            self.max_timestamp_ms = Some(self.max_timestamp_ms.map_or(t, |m| m.max(t)));
        }
    }

    /// Whether the tail rule closes this file now.
    pub fn idle_expired(&self, policy: &CutPolicy, now_ms: i64) -> bool {
        if self.last_append.elapsed() < policy.grace {
            return false;
        }
        let grace_ms = i64::try_from(policy.grace.as_millis()).unwrap_or(i64::MAX);
        match self.window {
            Some(w) => {
                let window_end = w.saturating_add(1).saturating_mul(policy.window_ms.max(1));
                now_ms >= window_end.saturating_add(grace_ms)
            }
            // Records without timestamps: quiet for `grace` is all we can go by.
            None => true,
        }
    }

    pub fn seal(self) -> SealedFile {
        let mut m = BTreeMap::new();
        m.insert(meta::TOPIC.to_owned(), self.topic.clone());
        m.insert(meta::PARTITION.to_owned(), self.partition.to_string());
        m.insert(meta::FIRST_OFFSET.to_owned(), self.first_offset.to_string());
        m.insert(meta::LAST_OFFSET.to_owned(), self.last_offset.to_string());
        m.insert(meta::RECORD_COUNT.to_owned(), self.records.to_string());
        if let Some(t) = self.min_timestamp_ms {
            m.insert(meta::MIN_TIMESTAMP.to_owned(), t.to_string());
        }
        if let Some(t) = self.max_timestamp_ms {
            m.insert(meta::MAX_TIMESTAMP.to_owned(), t.to_string());
        }
        if let Some((from, to)) = self.gap_before {
            m.insert(meta::GAP_BEFORE.to_owned(), format!("{from}-{to}"));
        }
        SealedFile {
            topic: self.topic,
            partition: self.partition,
            first_offset: self.first_offset,
            last_offset: self.last_offset,
            first_timestamp_ms: self.first_timestamp_ms,
            records: self.records,
            bytes: self.bytes,
            body: Body::Pending {
                writer: self.writer,
                metadata: m,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(offset: i64, ts: Option<i64>, size: usize) -> RawRecord {
        RawRecord {
            topic: "t".into(),
            partition: 0,
            offset,
            key: None,
            value: Some(vec![0; size].into()),
            headers: Default::default(),
            timestamp_ms: ts,
        }
    }

    fn policy() -> CutPolicy {
        CutPolicy {
            max_records: 4,
            max_bytes: 1_000,
            window_ms: 60_000,
            grace: Duration::ZERO,
        }
    }

    /// Cuts a record sequence into files, feeding it in chunks of `chunk` (batch sizes must
    /// not matter).
    fn cut(records: &[RawRecord], chunk: usize) -> Vec<(i64, i64)> {
        let p = policy();
        let mut files = vec![];
        let mut open: Option<OpenFile> = None;
        for batch in records.chunks(chunk) {
            for r in batch {
                if let Some(f) = add(&mut open, r, &p, Codec::Null, Instant::now()) {
                    files.push((f.first_offset, f.last_offset));
                }
            }
        }
        if let Some(f) = open {
            files.push((f.first_offset, f.last_offset));
        }
        files
    }

    #[test]
    fn cuts_on_count_bytes_and_window_whatever_the_batching() {
        let mut records = vec![];
        let mut o = 0;
        // 6 small records in window 0: cut after 4 (count).
        for _ in 0..6 {
            records.push(rec(o, Some(1_000 + o), 10));
            o += 1;
        }
        // window 1 starts: cut before it.
        records.push(rec(o, Some(61_000), 10));
        o += 1;
        // two big ones: 600 + 600 > 1000 bytes: cut between them.
        records.push(rec(o, Some(61_001), 600));
        o += 1;
        records.push(rec(o, Some(61_002), 600));
        o += 1;
        // a late record (earlier window) stays in the current file.
        records.push(rec(o, Some(5), 10));
        let expected = vec![(0, 3), (4, 5), (6, 7), (8, 9)];
        for chunk in [1, 2, 3, 7, 100] {
            assert_eq!(cut(&records, chunk), expected, "chunk {chunk}");
        }
    }

    #[test]
    fn a_single_oversized_record_still_gets_a_file() {
        let records = vec![rec(0, None, 5_000), rec(1, None, 5_000)];
        assert_eq!(cut(&records, 10), vec![(0, 0), (1, 1)]);
    }

    #[test]
    fn the_tail_closes_after_its_window_and_grace() {
        let p = CutPolicy {
            grace: Duration::ZERO,
            ..policy()
        };
        let mut open = None;
        add(
            &mut open,
            &rec(0, Some(1_000), 1),
            &p,
            Codec::Null,
            Instant::now(),
        );
        let f = open.expect("a file is open");
        assert!(!f.idle_expired(&p, 59_999));
        assert!(f.idle_expired(&p, 60_000));
        let quiet = CutPolicy {
            grace: Duration::from_secs(3600),
            ..policy()
        };
        assert!(!f.idle_expired(&quiet, i64::MAX), "not quiet long enough");
    }

    #[test]
    fn sealed_files_carry_their_range_in_the_header() {
        let p = policy();
        let mut open = None;
        for o in 7..10 {
            add(
                &mut open,
                &rec(o, Some(10 + o), 1),
                &p,
                Codec::Zstandard,
                Instant::now(),
            );
        }
        let f = open.expect("a file is open");
        let (_, bytes) = f.seal().encoded().expect("encoded");
        let (h, records) = ocf::read_all(&bytes).expect("readable");
        assert_eq!(h.number(meta::FIRST_OFFSET), Some(7));
        assert_eq!(h.number(meta::LAST_OFFSET), Some(9));
        assert_eq!(h.number(meta::RECORD_COUNT), Some(3));
        assert_eq!(h.number(meta::MIN_TIMESTAMP), Some(17));
        assert_eq!(h.number(meta::MAX_TIMESTAMP), Some(19));
        assert_eq!(records.len(), 3);
    }
}
