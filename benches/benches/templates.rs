//! Micro-benchmark: rendering one recipient's mail (subject, text and HTML of
//! `event_announcement`), which `mail.send_chunk` does once per recipient.

#![expect(
    missing_docs,
    reason = "criterion_main! generates an undocumented `main`"
)]

use std::hint::black_box;

use conveyor_templates::MailTemplates;
use criterion::{Criterion, criterion_group, criterion_main};
use serde_json::json;

fn templates(c: &mut Criterion) {
    let templates = MailTemplates::new(None);
    let context = json!({
        "name": "Ada Lovelace",
        "event": {"title": "RustConf", "date": "2026-12-01", "venue": "Hall <B>"},
        "unsubscribe_url": "https://example.com/u/123",
    });
    templates
        .render("event_announcement", &context)
        .expect("the shipped template renders");
    c.bench_function("template/event_announcement_all_parts", |b| {
        b.iter(|| templates.render(black_box("event_announcement"), black_box(&context)))
    });
}

criterion_group!(benches, templates);
criterion_main!(benches);
