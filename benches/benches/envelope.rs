//! Micro-benchmark: the envelope's wire encoding, paid once per publish and
//! once per delivery.

#![expect(
    missing_docs,
    reason = "criterion_main! generates an undocumented `main`"
)]

use std::hint::black_box;

use conveyor_schema::Envelope;
use criterion::{Criterion, criterion_group, criterion_main};
use serde_json::json;

fn envelope(c: &mut Criterion) {
    let noop = Envelope::new("diag.noop", json!({}));
    let bigger = Envelope::new(
        "diag.sleep",
        json!({"ms": 5, "note": "x".repeat(200), "list": (0..20).collect::<Vec<_>>()}),
    );
    let noop_bytes = noop.encode();
    let bigger_bytes = bigger.encode();
    c.bench_function("envelope/encode_noop", |b| {
        b.iter(|| black_box(&noop).encode())
    });
    c.bench_function("envelope/encode_1kb_args", |b| {
        b.iter(|| black_box(&bigger).encode())
    });
    c.bench_function("envelope/decode_noop", |b| {
        b.iter(|| Envelope::decode(black_box(&noop_bytes)))
    });
    c.bench_function("envelope/decode_1kb_args", |b| {
        b.iter(|| Envelope::decode(black_box(&bigger_bytes)))
    });
}

criterion_group!(benches, envelope);
criterion_main!(benches);
