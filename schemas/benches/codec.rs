//! Codec throughput (not a test): `cargo bench -p cdp-schemas --bench codec`.
//! Encodes and decodes the customer-event samples round-robin and prints events/s. The
//! system-level ceilings (broker, Postgres) are in the runner benchmark; this one shows the
//! codec is not what limits a consumer.

use std::hint::black_box;
use std::time::Instant;

use cdp_schemas::{decode, encode, fixtures, CustomerEvent};

fn main() {
    let n = 200_000;
    let samples = fixtures::customer_events();
    let encoded: Vec<Vec<u8>> = samples
        .iter()
        .map(|e| encode(e).unwrap_or_default())
        .collect();
    let bytes: usize = encoded.iter().map(Vec::len).sum::<usize>() / encoded.len();

    let t = Instant::now();
    for i in 0..n {
        let _ = black_box(encode(black_box(&samples[i % samples.len()])));
    }
    let enc = n as f64 / t.elapsed().as_secs_f64();

    let t = Instant::now();
    for i in 0..n {
        let _ = black_box(decode::<CustomerEvent>(black_box(
            &encoded[i % encoded.len()],
        )));
    }
    let dec = n as f64 / t.elapsed().as_secs_f64();

    println!("customer events, mean {bytes} bytes framed, {n} iterations");
    println!("encode: {enc:>10.0} events/s");
    println!("decode: {dec:>10.0} events/s");
}
