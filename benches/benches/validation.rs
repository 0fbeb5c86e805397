//! Micro-benchmark: what `POST /v1/jobs` does before anything durable happens,
//! finding the task in the catalogue and validating its arguments.

#![expect(
    missing_docs,
    reason = "criterion_main! generates an undocumented `main`"
)]

use std::hint::black_box;

use conveyor_schema::find_task;
use criterion::{Criterion, criterion_group, criterion_main};
use serde_json::json;

fn validation(c: &mut Criterion) {
    let empty = json!({});
    let sleep = json!({"ms": 5});
    let bad = json!({"ms": "soon"});
    c.bench_function("validate/noop", |b| {
        b.iter(|| find_task(black_box("diag.noop")).map(|t| t.validate(black_box(&empty))))
    });
    c.bench_function("validate/sleep_ok", |b| {
        b.iter(|| find_task(black_box("diag.sleep")).map(|t| t.validate(black_box(&sleep))))
    });
    c.bench_function("validate/sleep_bad_with_pointer", |b| {
        b.iter(|| find_task(black_box("diag.sleep")).map(|t| t.validate(black_box(&bad))))
    });
    c.bench_function("validate/request_body_parse", |b| {
        b.iter(|| {
            serde_json::from_slice::<serde_json::Value>(black_box(
                br#"{"task":"diag.noop","args":{}}"#,
            ))
        })
    });
}

criterion_group!(benches, validation);
criterion_main!(benches);
