//! The decoder over bad bytes: mutations of every fixture of every contract (bit flips,
//! truncations, overwritten bytes, huge lengths spliced in, random datums behind a valid
//! header) decode to an event or an error: never a panic, and never an allocation past the
//! decoder's limit (a corrupt length is refused before it is allocated).
//!
//! Seeded: `CDP_FUZZ_SEED` repeats a run (a failure prints its seed); `CDP_FUZZ_CASES` sets the
//! mutations per fixture (default 2,000).

use std::panic::{catch_unwind, AssertUnwindSafe};

use cdp_schemas::{fixtures, AuditEvent, CapsuleEvent, ComplianceEvent, Contract, CustomerEvent};
use cdp_schemas::{IdentityEvent, ProfileEvent};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Bytes of an Avro long (zig-zag varint) for `n`.
fn long(n: i64) -> Vec<u8> {
    let mut z = ((n << 1) ^ (n >> 63)) as u64;
    let mut out = Vec::new();
    loop {
        let b = (z & 0x7f) as u8;
        z >>= 7;
        if z == 0 {
            out.push(b);
            return out;
        }
        out.push(b | 0x80);
    }
}

/// The single-object header: marker and fingerprint.
const HEADER: usize = 10;

fn mutate(rng: &mut StdRng, valid: &[u8]) -> Vec<u8> {
    let mut b = valid.to_vec();
    match rng.random_range(0..6) {
        // Flip bits.
        0 => {
            for _ in 0..rng.random_range(1..8) {
                let i = rng.random_range(0..b.len());
                b[i] ^= 1 << rng.random_range(0..8);
            }
        }
        // Cut short.
        1 => b.truncate(rng.random_range(0..b.len())),
        // Overwrite a run with random bytes.
        2 => {
            let at = rng.random_range(0..b.len());
            for x in b.iter_mut().skip(at).take(rng.random_range(1..32)) {
                *x = rng.random();
            }
        }
        // Splice in a huge or negative length where a string, bytes, array or map count is read.
        3 => {
            let at = rng.random_range(HEADER.min(b.len())..=b.len());
            let n = [i64::MAX, i64::MIN, 1 << 40, 1 << 31, -1, -(1 << 20)][rng.random_range(0..6)];
            b.splice(at..at, long(n));
        }
        // A valid header with a random datum.
        4 => {
            b.truncate(HEADER.min(b.len()));
            let n = rng.random_range(0..512);
            b.extend((0..n).map(|_| rng.random::<u8>()));
        }
        // Trailing garbage.
        _ => {
            let n = rng.random_range(1..64);
            b.extend((0..n).map(|_| rng.random::<u8>()));
        }
    }
    b
}

fn hammer<E: Contract>(name: &str, fixtures: Vec<E>, rng: &mut StdRng, cases: usize, seed: u64) {
    for (i, event) in fixtures.iter().enumerate() {
        let valid = cdp_schemas::encode(event).unwrap_or_else(|e| panic!("{name}[{i}]: {e}"));
        for _ in 0..cases {
            let bad = mutate(rng, &valid);
            let outcome = catch_unwind(AssertUnwindSafe(|| cdp_schemas::decode::<E>(&bad)));
            assert!(
                outcome.is_ok(),
                "{name}[{i}]: the decoder panicked on {} (CDP_FUZZ_SEED={seed})",
                hex::encode(&bad)
            );
        }
    }
}

#[test]
fn mutated_records_of_every_contract_decode_or_fail_never_panic() {
    let seed = std::env::var("CDP_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    let cases = std::env::var("CDP_FUZZ_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2_000);
    eprintln!("CDP_FUZZ_SEED={seed}");
    let mut rng = StdRng::seed_from_u64(seed);
    hammer::<CustomerEvent>(
        "customer",
        fixtures::customer_events(),
        &mut rng,
        cases,
        seed,
    );
    hammer::<CapsuleEvent>("capsule", fixtures::capsule_events(), &mut rng, cases, seed);
    hammer::<ComplianceEvent>(
        "compliance",
        fixtures::compliance_events(),
        &mut rng,
        cases,
        seed,
    );
    hammer::<IdentityEvent>(
        "identity",
        fixtures::identity_events(),
        &mut rng,
        cases,
        seed,
    );
    hammer::<ProfileEvent>("profile", fixtures::profile_events(), &mut rng, cases, seed);
    hammer::<AuditEvent>("audit", fixtures::audit_events(), &mut rng, cases, seed);
}

#[test]
fn arbitrary_bytes_are_refused_whatever_their_length() {
    let mut rng = StdRng::seed_from_u64(rand::random());
    for len in 0..2_000 {
        let bytes: Vec<u8> = (0..len % 300).map(|_| rng.random()).collect();
        let outcome = catch_unwind(AssertUnwindSafe(|| {
            cdp_schemas::decode::<CustomerEvent>(&bytes)
        }));
        assert!(
            matches!(outcome, Ok(Err(_))),
            "random bytes {} were not refused cleanly",
            hex::encode(&bytes)
        );
    }
}
