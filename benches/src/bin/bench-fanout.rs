//! Scenario 4, mail fan-out: one campaign of N recipients sent to a local SMTP
//! sink by 1, 2 and 4 `conveyor worker` processes; recipients per second end
//! to end (from the first claim to the last `sent` in the ledger). The ceiling
//! is a bare lettre client driving the same sink at the workers' combined SMTP
//! concurrency.
//!
//! The campaign is written straight into the ledger and its planner enqueued
//! as a job (recorded and confirmed), so what is timed is planning, chunking,
//! claiming, SMTP and the ledger commits: the part that has to be safe.

use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;
use conveyor_benches::procs::WorkerProcess;
use conveyor_benches::results::Recorder;
use conveyor_benches::{Common, broker::Admin, db};
use conveyor_platform::amqp::{Outgoing, Publisher, Topology};
use conveyor_schema::Envelope;
use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Double};
use lettre::message::Mailbox;
use lettre::transport::smtp::client::AsyncSmtpConnection;
use lettre::transport::smtp::extension::ClientId;
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use mailin_embedded::{Handler, Response, Server};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

#[derive(Parser)]
struct Args {
    #[command(flatten)]
    common: Common,
    /// Recipients in the campaign.
    #[arg(long, default_value_t = 100_000)]
    recipients: i64,
    /// Worker-process counts to measure, e.g. `1,2,4`.
    #[arg(long, default_value = "1,2,4", value_delimiter = ',')]
    workers: Vec<usize>,
    /// SMTP conversations per worker (`mail.smtp_concurrency`).
    #[arg(long, default_value_t = 8)]
    smtp_concurrency: usize,
    /// The release `conveyor` binary.
    #[arg(long)]
    conveyor_bin: PathBuf,
    /// Give up after this long per measurement.
    #[arg(long, default_value_t = 600)]
    timeout_seconds: u64,
    /// The SMTP sink: Postfix's `smtp-sink` (fast; `apt-get install postfix`)
    /// when installed, else an embedded one (mailin-embedded, ~22 messages/s per connection).
    #[arg(long, default_value = "/usr/sbin/smtp-sink")]
    smtp_sink: PathBuf,
}

/// An SMTP sink that accepts everything and only counts messages.
#[derive(Clone)]
struct Sink(Arc<AtomicU64>);

impl Handler for Sink {
    fn data_end(&mut self) -> Response {
        self.0.fetch_add(1, Ordering::Relaxed);
        mailin_embedded::response::OK
    }
}

/// A running SMTP sink; a Postfix `smtp-sink` child is killed on drop.
struct SinkProcess(Option<std::process::Child>);

impl Drop for SinkProcess {
    fn drop(&mut self) {
        if let Some(child) = &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Starts Postfix's `smtp-sink` at `path` if it exists, else the embedded sink.
fn start_any_sink(path: &std::path::Path) -> anyhow::Result<(String, SinkProcess, &'static str)> {
    if !path.exists() {
        let (url, _count) = start_sink()?;
        return Ok((url, SinkProcess(None), "mailin-embedded"));
    }
    let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    // -c: count only; -u nobody: drop privileges; backlog 512.
    let child = std::process::Command::new(path)
        .args(["-c", "-u", "nobody", &format!("127.0.0.1:{port}"), "512"])
        .stdout(std::process::Stdio::null())
        .spawn()?;
    let sink = SinkProcess(Some(child));
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        anyhow::ensure!(
            Instant::now() < deadline,
            "smtp-sink did not listen on {port}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok((
        format!("smtp://127.0.0.1:{port}?tls=none"),
        sink,
        "postfix smtp-sink",
    ))
}

fn start_sink() -> anyhow::Result<(String, Arc<AtomicU64>)> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let port = listener.local_addr()?.port();
    let count = Arc::new(AtomicU64::new(0));
    let mut server = Server::new(Sink(count.clone()));
    server
        .with_name("sink")
        .with_num_threads(128)
        .with_tcp_listener(listener);
    std::thread::spawn(move || {
        let _ = server.serve();
    });
    Ok((format!("smtp://127.0.0.1:{port}?tls=none"), count))
}

#[derive(QueryableByName)]
struct Span {
    #[diesel(sql_type = BigInt)]
    sent: i64,
    #[diesel(sql_type = Double)]
    seconds: f64,
}

/// Writes a sending campaign of `n` recipients and enqueues its planner.
async fn start_campaign(
    common: &Common,
    db: &conveyor_schema::pool::PgPool,
    n: i64,
) -> anyhow::Result<Uuid> {
    let id = Uuid::now_v7();
    let sql = format!(
        "INSERT INTO campaigns (id, name, template, from_addr, vars, state)
         VALUES ('{id}', 'bench', 'event_announcement', 'Bench <bench@example.com>',
                 '{{\"event\": {{\"title\": \"Bench\", \"date\": \"today\", \"venue\": \"here\"}}}}', 'sending');
         INSERT INTO campaign_recipients (campaign_id, email, vars)
         SELECT '{id}', 'r' || i || '@example.com', jsonb_build_object('name', 'R' || i)
           FROM generate_series(1, {n}) i;"
    );
    conveyor_schema::pool::run(db, move |conn| conn.batch_execute(&sql)).await?;
    let topology = Topology::for_config(&common.config());
    let stop = CancellationToken::new();
    let publisher = Publisher::start(
        &[common.amqp_url.as_str()],
        "bench-fanout",
        topology.clone(),
        1,
        Duration::from_secs(10),
        stop.clone(),
    );
    anyhow::ensure!(
        publisher.wait_connected(Duration::from_secs(10)).await,
        "broker unreachable"
    );
    let envelope = Envelope::new("mail.plan_campaign", serde_json::json!({"campaign_id": id}));
    publisher
        .publish(&Outgoing::job(&topology, "mail", &envelope))
        .await?;
    stop.cancel();
    Ok(id)
}

async fn measure_workers(
    args: &Args,
    sink_url: &str,
    workers: usize,
) -> anyhow::Result<(f64, f64)> {
    let common = &args.common;
    let db = db::pool(&common.database_url);
    let id = start_campaign(common, &db, args.recipients).await?;
    let env = [
        ("CONVEYOR_MAIL_SMTP_URL", sink_url.to_owned()),
        (
            "CONVEYOR_MAIL_SMTP_CONCURRENCY",
            args.smtp_concurrency.to_string(),
        ),
        (
            "CONVEYOR_MAIL_SMTP_POOL_SIZE",
            args.smtp_concurrency.to_string(),
        ),
    ];
    let spawned = Instant::now();
    let procs = (0..workers)
        .map(|_| WorkerProcess::spawn_with_env(&args.conveyor_bin, common, &env))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let deadline = spawned + Duration::from_secs(args.timeout_seconds);
    let span = loop {
        let query = format!(
            "SELECT count(*) FILTER (WHERE state = 'sent') AS sent,
                    coalesce(extract(epoch FROM max(sent_at) - min(claimed_at)), 0)::float8 AS seconds
               FROM campaign_recipients WHERE campaign_id = '{id}'"
        );
        let span: Span =
            conveyor_schema::pool::run(&db, move |conn| diesel::sql_query(query).get_result(conn))
                .await?;
        if span.sent >= args.recipients {
            break span;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "only {} of {} sent",
            span.sent,
            args.recipients
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let wall = spawned.elapsed().as_secs_f64();
    for worker in procs {
        worker.stop();
    }
    Ok((
        span.sent as f64 / span.seconds.max(1e-9),
        span.sent as f64 / wall,
    ))
}

/// One message of the same shape as the campaign's.
fn bench_message(from: &Mailbox, i: u64) -> anyhow::Result<Message> {
    Ok(Message::builder()
        .from(from.clone())
        .to(format!("r{i}@example.com").parse()?)
        .subject("Bench, you're invited: Bench")
        .multipart(lettre::message::MultiPart::alternative_plain_html(
            "Hello R, we are delighted to invite you.".repeat(8),
            "<p>Hello R, we are delighted to invite you.</p>".repeat(8),
        ))?)
}

/// The bare lettre client at `concurrency`: one `AsyncSmtpConnection` per
/// task on a socket with `TCP_NODELAY` (no ledger, no broker), the ceiling.
/// With `stock_transport`, lettre's own pooled transport instead, which keeps
/// Nagle's algorithm on (what Conveyor used before; see RESULTS.md).
async fn measure_ceiling(
    sink_url: &str,
    n: usize,
    concurrency: usize,
    stock_transport: bool,
) -> anyhow::Result<f64> {
    let url = url::Url::parse(sink_url)?;
    let addr = format!(
        "{}:{}",
        url.host_str().unwrap_or("127.0.0.1"),
        url.port().unwrap_or(25)
    );
    let transport = Arc::new(
        AsyncSmtpTransport::<Tokio1Executor>::from_url(&sink_url.replace("?tls=none", ""))?
            .pool_config(lettre::transport::smtp::PoolConfig::new().max_size(concurrency as u32))
            .build(),
    );
    let from: Mailbox = "Bench <bench@example.com>".parse()?;
    let started = Instant::now();
    let next = Arc::new(AtomicU64::new(0));
    let tasks: Vec<_> = (0..concurrency)
        .map(|_| {
            let (transport, from, next, addr) =
                (transport.clone(), from.clone(), next.clone(), addr.clone());
            tokio::spawn(async move {
                let mut conn = if stock_transport {
                    None
                } else {
                    let stream = tokio::net::TcpStream::connect(&addr).await?;
                    stream.set_nodelay(true)?;
                    Some(
                        AsyncSmtpConnection::connect_with_transport(
                            Box::new(stream),
                            &ClientId::default(),
                        )
                        .await?,
                    )
                };
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= n as u64 {
                        return Ok::<_, anyhow::Error>(());
                    }
                    let message = bench_message(&from, i)?;
                    match &mut conn {
                        Some(conn) => {
                            conn.send(message.envelope(), &message.formatted()).await?;
                        }
                        None => {
                            transport.send(message).await?;
                        }
                    }
                }
            })
        })
        .collect();
    for task in tasks {
        task.await??;
    }
    Ok(n as f64 / started.elapsed().as_secs_f64())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let common = &args.common;
    let topology = Topology::for_config(&common.config());
    let admin = Admin::connect(&common.amqp_url).await?;
    admin.declare(&topology).await?;
    let (sink_url, _sink, sink_name) = start_any_sink(&args.smtp_sink)?;
    println!("SMTP sink: {sink_name} at {sink_url}");
    let recorder = Recorder::new(common, "fanout", "conveyor");
    for &workers in &args.workers {
        let (rate, wall_rate) = measure_workers(&args, &sink_url, workers).await?;
        println!("{workers} worker(s): {rate:.0} recipients/s ({wall_rate:.0}/s from spawn)");
        recorder.put(&format!("rate_{workers}w"), rate, "recipients/s")?;
        if workers == 1 {
            recorder.put("rate", rate, "recipients/s")?;
        }
    }
    let concurrency = args.smtp_concurrency * args.workers.iter().copied().max().unwrap_or(1);
    let messages = (args.recipients as usize).min(50_000);
    let ceiling = measure_ceiling(&sink_url, messages, concurrency, false).await?;
    println!("bare lettre (TCP_NODELAY) at concurrency {concurrency}: {ceiling:.0} messages/s");
    Recorder::new(common, "fanout", "ceiling").put("rate", ceiling, "messages/s")?;
    let stock = measure_ceiling(&sink_url, messages.min(10_000), concurrency, true).await?;
    println!(
        "lettre's pooled transport (Nagle on) at concurrency {concurrency}: {stock:.0} messages/s"
    );
    Recorder::new(common, "fanout", "lettre_transport").put("rate", stock, "messages/s")?;
    admin.close().await;
    Ok(())
}
