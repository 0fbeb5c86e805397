//! A lean HTTP/1.1 client for the load generators: one keep-alive connection
//! per task, no pool, so the generator spends as little of the shared CPU as possible.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::{self, SendRequest};
use hyper::{Request, StatusCode, header};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use uuid::Uuid;

/// The body of every benchmark request.
pub const NOOP_JOB: &[u8] = br#"{"task":"diag.noop","args":{}}"#;

/// One open connection to the ingress.
pub struct Client {
    sender: SendRequest<Full<Bytes>>,
    host: String,
    /// `Bearer <key>` from `BENCH_API_KEY` (run.sh creates a key with `enqueue:*`).
    authorization: Option<String>,
}

/// What one `POST /v1/jobs` or `POST /v1/jobs/batch` gave.
pub struct Outcome {
    /// HTTP status.
    pub status: StatusCode,
    /// The ids of the jobs accepted (none unless 202).
    pub ids: Vec<Uuid>,
    /// Round-trip time.
    pub latency: Duration,
}

#[derive(Deserialize)]
struct Accepted {
    id: Uuid,
}

#[derive(Deserialize)]
struct BatchAccepted {
    jobs: Vec<Accepted>,
}

/// A `POST /v1/jobs/batch` body of `count` `diag.noop` jobs.
pub fn noop_batch(count: usize) -> Bytes {
    let jobs = vec![r#"{"task":"diag.noop","args":{}}"#; count].join(",");
    Bytes::from(format!(r#"{{"jobs":[{jobs}]}}"#))
}

impl Client {
    /// Opens a connection to `addr`.
    pub async fn connect(addr: SocketAddr) -> anyhow::Result<Self> {
        let stream = tokio::net::TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let (sender, connection) = http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(connection);
        Ok(Self {
            sender,
            host: addr.to_string(),
            authorization: std::env::var("BENCH_API_KEY")
                .ok()
                .map(|key| format!("Bearer {key}")),
        })
    }

    /// Posts `body` to `/v1/jobs` and reads the answer.
    pub async fn enqueue(&mut self, body: &'static [u8]) -> anyhow::Result<Outcome> {
        self.accepted_ids("/v1/jobs", Bytes::from_static(body), |body| {
            Ok(vec![serde_json::from_slice::<Accepted>(body)?.id])
        })
        .await
    }

    /// Posts `body` (see [`noop_batch`]) to `/v1/jobs/batch` and reads the answer.
    pub async fn enqueue_batch(&mut self, body: Bytes) -> anyhow::Result<Outcome> {
        self.accepted_ids("/v1/jobs/batch", body, |body| {
            let batch: BatchAccepted = serde_json::from_slice(body)?;
            Ok(batch.jobs.into_iter().map(|job| job.id).collect())
        })
        .await
    }

    async fn accepted_ids(
        &mut self,
        path: &str,
        body: Bytes,
        ids_of: impl Fn(&[u8]) -> anyhow::Result<Vec<Uuid>>,
    ) -> anyhow::Result<Outcome> {
        let authorization = self.authorization.clone();
        let headers: Vec<(&str, &str)> = authorization
            .as_deref()
            .map(|value| ("authorization", value))
            .into_iter()
            .collect();
        let Answer {
            status,
            body,
            latency,
        } = self.post_json(path, &headers, body).await?;
        let ids = if status == StatusCode::ACCEPTED {
            ids_of(&body)?
        } else {
            Vec::new()
        };
        Ok(Outcome {
            status,
            ids,
            latency,
        })
    }
}

/// What one POST gave: status, whole body and round-trip time.
pub struct Answer {
    /// HTTP status.
    pub status: StatusCode,
    /// The response body, read to the end.
    pub body: Bytes,
    /// From sending the request to the last byte of the answer.
    pub latency: Duration,
}

impl Client {
    /// Posts the JSON `body` to `path` with the extra `headers` and reads the whole answer.
    pub async fn post_json(
        &mut self,
        path: &str,
        headers: &[(&str, &str)],
        body: Bytes,
    ) -> anyhow::Result<Answer> {
        self.sender.ready().await?;
        let mut request = Request::post(path)
            .header(header::HOST, self.host.as_str())
            .header(header::CONTENT_TYPE, "application/json");
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let request = request.body(Full::new(body))?;
        let started = Instant::now();
        let response = self.sender.send_request(request).await?;
        let status = response.status();
        let body = response.into_body().collect().await?.to_bytes();
        Ok(Answer {
            status,
            body,
            latency: started.elapsed(),
        })
    }
}

/// Peak and current resident memory of process `pid`, in MiB (`VmHWM`, `VmRSS`).
pub fn memory_mib(pid: u32) -> anyhow::Result<(f64, f64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| -> f64 {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<f64>().ok())
            .map_or(0.0, |kb| kb / 1024.0)
    };
    Ok((field("VmHWM:"), field("VmRSS:")))
}
