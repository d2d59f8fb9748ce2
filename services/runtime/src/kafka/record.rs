//! Owned copies of consumed records, detached from librdkafka's buffers.
//!
//! Copying a record out of librdkafka is on every consumer's hot path, so it allocates
//! nothing per record: the topic name is shared by all records of a topic, and the key,
//! value and headers are copied into a chunk of memory shared by consecutive records
//! ([`RecordCopier`]). A chunk is freed when the last record that points into it is
//! dropped; a consumer that keeps a few records for a long time keeps their chunks too
//! (at most [`CHUNK_BYTES`] each, or one record's size if larger).

use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use rdkafka::message::{BorrowedMessage, Headers, Message};

/// Size of the memory chunks records are copied into.
pub const CHUNK_BYTES: usize = 256 * 1024;

/// A topic and partition.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TopicPartition {
    pub topic: String,
    pub partition: i32,
}

/// A consumed record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RawRecord {
    pub topic: Arc<str>,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Bytes>,
    /// `None` for a tombstone.
    pub value: Option<Bytes>,
    pub headers: RecordHeaders,
    /// Milliseconds since the epoch, when the broker reports one.
    pub timestamp_ms: Option<i64>,
}

impl RawRecord {
    pub fn topic_partition(&self) -> TopicPartition {
        TopicPartition {
            topic: self.topic.to_string(),
            partition: self.partition,
        }
    }

    /// The value of the first header named `name` that has one.
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers.get(name)
    }
}

/// A record's headers in order (names may repeat, values may be null), stored as one
/// encoded byte string: per header, the name's length (u32, little-endian) and bytes, then
/// the value's length (`u32::MAX` for null) and bytes.
#[derive(Clone, Default, PartialEq, Eq, Hash)]
pub struct RecordHeaders {
    encoded: Bytes,
}

const NULL_VALUE: u32 = u32::MAX;

fn encoded_len<'a>(headers: impl IntoIterator<Item = (&'a str, Option<&'a [u8]>)>) -> usize {
    headers
        .into_iter()
        .map(|(k, v)| 8 + k.len() + v.map_or(0, <[u8]>::len))
        .sum()
}

fn put_header(out: &mut BytesMut, name: &str, value: Option<&[u8]>) {
    // Kafka bounds a record far below 4 GiB, so lengths fit in a u32 and never reach
    // `NULL_VALUE`.
    out.put_u32_le(name.len() as u32);
    out.put_slice(name.as_bytes());
    match value {
        Some(v) => {
            out.put_u32_le(v.len() as u32);
            out.put_slice(v);
        }
        None => out.put_u32_le(NULL_VALUE),
    }
}

impl RecordHeaders {
    /// Headers from (name, value) pairs, in order.
    pub fn from_pairs<'a>(headers: impl IntoIterator<Item = (&'a str, Option<&'a [u8]>)>) -> Self {
        let mut out = BytesMut::new();
        for (k, v) in headers {
            put_header(&mut out, k, v);
        }
        Self {
            encoded: out.freeze(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.encoded.is_empty()
    }

    pub fn len(&self) -> usize {
        self.iter().count()
    }

    /// The headers in order, as (name, value).
    pub fn iter(&self) -> HeaderIter<'_> {
        HeaderIter {
            rest: &self.encoded,
        }
    }

    /// The value of the first header named `name` that has one.
    pub fn get(&self, name: &str) -> Option<&[u8]> {
        self.iter().find(|(k, _)| *k == name).and_then(|(_, v)| v)
    }

    /// Owned (name, value) pairs, for code that builds or compares headers.
    pub fn to_pairs(&self) -> Vec<(String, Option<Vec<u8>>)> {
        self.iter()
            .map(|(k, v)| (k.to_owned(), v.map(<[u8]>::to_vec)))
            .collect()
    }
}

impl std::fmt::Debug for RecordHeaders {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

impl<'a> FromIterator<(&'a str, Option<&'a [u8]>)> for RecordHeaders {
    fn from_iter<T: IntoIterator<Item = (&'a str, Option<&'a [u8]>)>>(iter: T) -> Self {
        Self::from_pairs(iter)
    }
}

impl<'a> IntoIterator for &'a RecordHeaders {
    type Item = (&'a str, Option<&'a [u8]>);
    type IntoIter = HeaderIter<'a>;

    fn into_iter(self) -> HeaderIter<'a> {
        self.iter()
    }
}

/// Iterator over [`RecordHeaders`].
pub struct HeaderIter<'a> {
    rest: &'a [u8],
}

impl<'a> HeaderIter<'a> {
    fn take_u32(&mut self) -> Option<u32> {
        let (n, rest) = self.rest.split_first_chunk::<4>()?;
        self.rest = rest;
        Some(u32::from_le_bytes(*n))
    }

    fn take(&mut self, len: usize) -> Option<&'a [u8]> {
        let (head, rest) = self.rest.split_at_checked(len)?;
        self.rest = rest;
        Some(head)
    }
}

impl<'a> Iterator for HeaderIter<'a> {
    type Item = (&'a str, Option<&'a [u8]>);

    fn next(&mut self) -> Option<Self::Item> {
        // The encoding is only ever written by `put_header` from valid names: a malformed
        // remainder (which cannot occur) ends the iteration.
        let name_len = self.take_u32()? as usize;
        let name = std::str::from_utf8(self.take(name_len)?).ok()?;
        let value = match self.take_u32()? {
            NULL_VALUE => None,
            len => Some(self.take(len as usize)?),
        };
        Some((name, value))
    }
}

/// Copies records out of librdkafka into shared chunks (see the module documentation).
/// One per consuming thread.
#[derive(Default)]
pub struct RecordCopier {
    chunk: BytesMut,
    topic: Option<Arc<str>>,
}

impl RecordCopier {
    pub fn new() -> Self {
        Self::default()
    }

    fn topic(&mut self, name: &str) -> Arc<str> {
        match &self.topic {
            Some(t) if &**t == name => t.clone(),
            _ => {
                let t: Arc<str> = Arc::from(name);
                self.topic = Some(t.clone());
                t
            }
        }
    }

    /// Room for `len` more bytes in the current chunk, starting a new chunk when needed.
    fn reserve(&mut self, len: usize) {
        if self.chunk.capacity() - self.chunk.len() < len {
            self.chunk = BytesMut::with_capacity(CHUNK_BYTES.max(len));
        }
    }

    /// An owned copy of `m`.
    pub fn copy(&mut self, m: &BorrowedMessage<'_>) -> RawRecord {
        let key = m.key();
        let value = m.payload();
        let headers = m.headers();
        let header_len: usize =
            headers.map_or(0, |hs| encoded_len(hs.iter().map(|h| (h.key, h.value))));
        let (key_len, value_len) = (key.map_or(0, <[u8]>::len), value.map_or(0, <[u8]>::len));
        self.reserve(key_len + value_len + header_len);
        let start = self.chunk.len();
        if let Some(k) = key {
            self.chunk.put_slice(k);
        }
        if let Some(v) = value {
            self.chunk.put_slice(v);
        }
        if let Some(hs) = headers {
            for h in hs.iter() {
                put_header(&mut self.chunk, h.key, h.value);
            }
        }
        debug_assert_eq!(self.chunk.len() - start, key_len + value_len + header_len);
        let all = self.chunk.split().freeze();
        RawRecord {
            topic: self.topic(m.topic()),
            partition: m.partition(),
            offset: m.offset(),
            key: key.map(|_| all.slice(..key_len)),
            value: value.map(|_| all.slice(key_len..key_len + value_len)),
            headers: RecordHeaders {
                encoded: if header_len == 0 {
                    Bytes::new()
                } else {
                    all.slice(key_len + value_len..)
                },
            },
            timestamp_ms: m.timestamp().to_millis(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_keep_order_repeats_and_nulls() {
        let h = RecordHeaders::from_pairs([
            ("a", Some(b"1".as_slice())),
            ("trace", None),
            ("a", Some(b"".as_slice())),
            ("é", Some(b"\x00\xff".as_slice())),
        ]);
        let got: Vec<_> = h.iter().collect();
        assert_eq!(
            got,
            vec![
                ("a", Some(b"1".as_slice())),
                ("trace", None),
                ("a", Some(b"".as_slice())),
                ("é", Some(b"\x00\xff".as_slice())),
            ]
        );
        assert_eq!(h.len(), 4);
        assert_eq!(h.get("a"), Some(b"1".as_slice()));
        assert_eq!(h.get("trace"), None);
        assert_eq!(h.get("missing"), None);
        assert_eq!(format!("{h:?}").matches("trace").count(), 1);
    }

    #[test]
    fn no_headers_is_empty_and_equal_to_default() {
        let h = RecordHeaders::from_pairs(std::iter::empty());
        assert!(h.is_empty());
        assert_eq!(h.len(), 0);
        assert_eq!(h, RecordHeaders::default());
        assert_eq!(h.iter().next(), None);
    }

    #[test]
    fn equal_headers_compare_equal_and_round_trip_through_pairs() {
        let a: RecordHeaders = [("x", Some(b"1".as_slice())), ("y", None)]
            .into_iter()
            .collect();
        let pairs = a.to_pairs();
        let b = RecordHeaders::from_pairs(pairs.iter().map(|(k, v)| (k.as_str(), v.as_deref())));
        assert_eq!(a, b);
        assert_ne!(a, RecordHeaders::from_pairs([("x", Some(b"2".as_slice()))]));
    }
}
