//! Kafka's default partitioner for keyed records: murmur2 of the key, as the Java client
//! computes it (`Utils.murmur2`, sign bit cleared, modulo the partition count). librdkafka's
//! `murmur2_random` (our producer's setting) agrees with it, and so do Kafka Streams and every
//! Java producer, so a record written by any path (the producer, an outbox relay, a tombstone
//! later) lands in the partition of every other record of its key.

/// The Java client's murmur2 of `data` (seed `0x9747b28c`).
pub fn murmur2(data: &[u8]) -> u32 {
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;
    let mut h: u32 = 0x9747_b28c ^ data.len() as u32;
    let mut chunks = data.chunks_exact(4);
    for c in &mut chunks {
        let mut k = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    let rest = chunks.remainder();
    if !rest.is_empty() {
        for (i, b) in rest.iter().enumerate().rev() {
            h ^= u32::from(*b) << (8 * i);
        }
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h
}

/// The partition of a keyed record among `partitions`.
pub fn partition_of(key: &[u8], partitions: i32) -> i32 {
    let n = partitions.max(1) as u32;
    ((murmur2(key) & 0x7fff_ffff) % n) as i32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_java_clients_values() {
        // librdkafka's unit test of its Java-compatible murmur2 (rdmurmur2.c), which takes
        // them from the Java client.
        assert_eq!(murmur2(b"kafka"), 0xd067_cf64);
        assert_eq!(murmur2(b"giberish123456789"), 0x8f55_2b0c);
        assert_eq!(murmur2(b""), 0x106e_08d9);
    }

    #[test]
    fn partitions_are_stable_and_spread() {
        let p = partition_of(b"profile-1", 6);
        assert_eq!(p, partition_of(b"profile-1", 6));
        let used: std::collections::BTreeSet<i32> = (0..100)
            .map(|i| partition_of(format!("k{i}").as_bytes(), 6))
            .collect();
        assert_eq!(used.len(), 6);
        assert!(used.iter().all(|p| (0..6).contains(p)));
    }
}
