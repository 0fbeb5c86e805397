//! Signed webhooks: Standard-Webhooks-signed `UPDATE` events posted to
//! `POST /v1/webhooks/{source}/profiles` of a running ingress from 64
//! keep-alive connections for a fixed time, each under a new `webhook-id` and
//! the current timestamp, signed with the key in `BENCH_WEBHOOK_KEY` (`whsec_`
//! gives `v1` HMAC, `whsk_` gives `v1a` Ed25519) by the platform's own
//! signing code. Reports accepted (202) webhooks per second and p50/p99
//! latency, then proves every 202 was real: each accepted job id has a record,
//! and the remembered ids, the `accepted` events, the `webhook.profile_sync`
//! records and the messages in the `webhooks` work queue all number exactly the
//! 202s (no worker runs meanwhile).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Parser;
use conveyor_benches::http::Client;
use conveyor_benches::results::Recorder;
use conveyor_benches::stats::{ms, quantile_ms};
use conveyor_benches::{Common, broker::Admin, db};
use conveyor_ingress::routes::webhooks::WebhookAccepted;
use conveyor_platform::amqp::Topology;
use conveyor_platform::webhook_signature::SigningKey;
use conveyor_schema::TaskSpec;
use conveyor_schema::args::webhooks::ProfileSync;
use hyper::StatusCode;
use uuid::Uuid;

#[derive(Parser)]
struct Args {
    #[command(flatten)]
    common: Common,
    /// The ingress under test.
    #[arg(long)]
    addr: SocketAddr,
    /// The configured webhook source (`[webhooks.sources.<name>]`) to post to.
    #[arg(long, default_value = "bench")]
    source: String,
    /// The producer's signing key: `whsec_…` (v1, HMAC) or `whsk_…` (v1a, Ed25519).
    #[arg(long, env = "BENCH_WEBHOOK_KEY", hide_env_values = true)]
    key: String,
    /// Concurrent connections.
    #[arg(long, default_value_t = 64)]
    connections: usize,
    /// How long to load it.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
}

#[derive(Default)]
struct Tally {
    job_ids: Vec<Uuid>,
    latencies: Vec<f64>,
    refused: u64,
}

/// One `UPDATE` for its own profile, as the membership system sends it.
fn event(profile_id: &str) -> Bytes {
    let body = serde_json::json!({
        "action": "UPDATE",
        "profile_id": profile_id,
        "occurred_at": chrono::Utc::now().to_rfc3339(),
        "data": {"email": format!("{profile_id}@bench.example"), "display_name": "Bench Member", "locale": "en-GB"},
    });
    Bytes::from(body.to_string())
}

/// Signs and posts webhooks on one connection until `deadline`.
async fn load(
    addr: SocketAddr,
    path: Arc<str>,
    key: Arc<SigningKey>,
    deadline: Instant,
) -> anyhow::Result<Tally> {
    let mut tally = Tally::default();
    let mut client = Client::connect(addr).await?;
    while Instant::now() < deadline {
        let id = format!("msg_{}", Uuid::new_v4().simple());
        let body = event(&id);
        let timestamp = chrono::Utc::now().timestamp();
        let signature = key.sign(&id, timestamp, &body);
        let timestamp = timestamp.to_string();
        let headers = [
            ("webhook-id", id.as_str()),
            ("webhook-timestamp", timestamp.as_str()),
            ("webhook-signature", signature.as_str()),
        ];
        let answer = client.post_json(&path, &headers, body).await?;
        tally.latencies.push(ms(answer.latency));
        if answer.status == StatusCode::ACCEPTED {
            let accepted: WebhookAccepted = serde_json::from_slice(&answer.body)?;
            tally.job_ids.push(accepted.job_id);
        } else {
            tally.refused += 1;
            if tally.refused == 1 {
                eprintln!(
                    "refused: {} {}",
                    answer.status,
                    String::from_utf8_lossy(&answer.body)
                );
            }
        }
    }
    Ok(tally)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let common = &args.common;
    let key = SigningKey::parse(&args.key).map_err(|e| anyhow::anyhow!("--key: {e}"))?;
    let scheme = match key {
        SigningKey::Hmac(_) => "v1",
        SigningKey::Ed25519(_) => "v1a",
    };
    let db = db::pool(&common.database_url);
    let topology = Topology::for_config(&common.config());
    let work_queue = topology.work_queue(ProfileSync::options().queue);
    let admin = Admin::connect(&common.amqp_url).await?;
    admin.declare(&topology).await?;
    admin.purge(&work_queue).await?;
    db::truncate_jobs(&db).await?;
    db::truncate_webhooks(&db).await?;

    let path: Arc<str> = format!("/v1/webhooks/{}/profiles", args.source).into();
    let key = Arc::new(key);
    let deadline = Instant::now() + Duration::from_secs(args.seconds);
    let started = Instant::now();
    let tasks: Vec<_> = (0..args.connections)
        .map(|_| tokio::spawn(load(args.addr, path.clone(), key.clone(), deadline)))
        .collect();
    let mut all = Tally::default();
    for task in tasks {
        let tally = task.await??;
        all.job_ids.extend(tally.job_ids);
        all.latencies.extend(tally.latencies);
        all.refused += tally.refused;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let accepted = all.job_ids.len() as i64;

    // The proof that each 202 meant a remembered id, a record and a confirmed message.
    let recorded = db::count_ids(&db, all.job_ids.clone()).await?;
    let records = db::count_task(&db, ProfileSync::NAME).await?;
    let deliveries = db::count_webhook_deliveries(&db, &args.source).await?;
    let events = db::count_webhook_events(&db, &args.source, "accepted").await?;
    let queued = i64::from(admin.depth(&work_queue).await?);
    let consistent = [recorded, records, deliveries, events, queued]
        .iter()
        .all(|n| *n == accepted);
    println!(
        "scheme={scheme} accepted={accepted} refused={} recorded={recorded} records={records} deliveries={deliveries} events={events} queued={queued} consistent={consistent}",
        all.refused
    );

    let scenario = format!("webhooks_{scheme}");
    let out = Recorder::new(common, &scenario, "conveyor");
    out.put("rate", accepted as f64 / elapsed, "webhooks/s")?;
    out.put("p50_ms", quantile_ms(&mut all.latencies, 0.50), "ms")?;
    out.put("p99_ms", quantile_ms(&mut all.latencies, 0.99), "ms")?;
    out.put("refused", all.refused as f64, "requests")?;
    out.put("consistent", f64::from(u8::from(consistent)), "bool")?;
    admin.purge(&work_queue).await?;
    admin.close().await;
    anyhow::ensure!(
        consistent,
        "202s and what they promise disagree: accepted {accepted}, records of accepted ids {recorded}, \
         {} records {records}, remembered ids {deliveries}, accepted events {events}, queued {queued}",
        ProfileSync::NAME
    );
    Ok(())
}
