//! The message every queue carries: one job, versioned.
//!
//! The `id` is the job's identity everywhere (job record, status URL, dedup key).
//! A consumer that meets an envelope version it does not know must dead-letter
//! it with the reason rather than guess or drop it; [`Envelope::decode`] says
//! which of the two failures happened so the worker can record it.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

/// The envelope format this build writes and understands.
pub const ENVELOPE_VERSION: u16 = 1;

/// One job on the wire.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Envelope {
    /// Job id (UUIDv7, so ids sort by creation time). Also the dedup key.
    pub id: Uuid,
    /// Stable task name from the catalogue, e.g. `diag.noop`.
    pub task: String,
    /// Envelope format version; see [`ENVELOPE_VERSION`].
    pub version: u16,
    /// Task arguments, already validated against the task's argument type by the producer.
    pub args: Value,
    /// 1 for the first run; incremented each time the job is re-published for a retry.
    pub attempt: u32,
    /// When the producer first accepted the job (unchanged across retries).
    pub enqueued_at: DateTime<Utc>,
    /// The producer's Idempotency-Key, when it sent one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    /// W3C trace context of the request that created the job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace: Option<TraceContext>,
    /// The dead job this one replays, when it is a replay.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replay_of: Option<Uuid>,
    /// Do not run before this time (a delayed job). A worker that receives it
    /// early sends it back to a delay queue for the remaining time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_before: Option<DateTime<Utc>>,
}

/// W3C trace-context headers carried from the producer to the worker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TraceContext {
    /// The `traceparent` header value.
    pub traceparent: String,
    /// The `tracestate` header value, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tracestate: Option<String>,
}

/// Why a message could not be read as an [`Envelope`].
#[derive(Debug, thiserror::Error)]
pub enum EnvelopeError {
    /// The body is not JSON or does not have the envelope's shape.
    #[error("undecodable envelope: {0}")]
    Malformed(#[from] serde_json::Error),
    /// The body is an envelope of a version this build does not know.
    #[error("unsupported envelope version {found} (this build reads version {ENVELOPE_VERSION})")]
    UnsupportedVersion {
        /// The version found in the message.
        found: u64,
    },
}

impl Envelope {
    /// A first-attempt envelope for `task` with a fresh UUIDv7 id.
    pub fn new(task: impl Into<String>, args: Value) -> Self {
        Self {
            id: Uuid::now_v7(),
            task: task.into(),
            version: ENVELOPE_VERSION,
            args,
            attempt: 1,
            enqueued_at: Utc::now(),
            idempotency_key: None,
            trace: None,
            replay_of: None,
            not_before: None,
        }
    }

    /// Serializes to the JSON bytes published on the wire.
    pub fn encode(&self) -> Vec<u8> {
        // Serializing a struct of plain fields and a `Value` cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Reads an envelope, checking the version before the shape so that a newer
    /// producer's message is reported as such rather than as garbage.
    pub fn decode(bytes: &[u8]) -> Result<Self, EnvelopeError> {
        #[derive(Deserialize)]
        struct VersionOnly {
            version: u64,
        }
        if let Ok(VersionOnly { version }) = serde_json::from_slice::<VersionOnly>(bytes)
            && version != u64::from(ENVELOPE_VERSION)
        {
            return Err(EnvelopeError::UnsupportedVersion { found: version });
        }
        Ok(serde_json::from_slice(bytes)?)
    }

    /// The same job, one attempt later (for a retry).
    pub fn next_attempt(&self) -> Self {
        Self {
            attempt: self.attempt + 1,
            ..self.clone()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn round_trips() {
        let env = Envelope::new("diag.noop", json!({}));
        assert_eq!(Envelope::decode(&env.encode()).unwrap(), env);
    }

    #[test]
    fn reports_unknown_version_distinctly() {
        let mut v = serde_json::to_value(Envelope::new("diag.noop", json!({}))).unwrap();
        v["version"] = json!(7);
        v["from_the_future"] = json!(true);
        let err = Envelope::decode(&serde_json::to_vec(&v).unwrap()).unwrap_err();
        assert!(
            matches!(err, EnvelopeError::UnsupportedVersion { found: 7 }),
            "{err}"
        );
    }

    #[test]
    fn rejects_garbage_and_unknown_fields() {
        assert!(matches!(
            Envelope::decode(b"nope"),
            Err(EnvelopeError::Malformed(_))
        ));
        let mut v = serde_json::to_value(Envelope::new("diag.noop", json!({}))).unwrap();
        v["extra"] = json!(1);
        assert!(matches!(
            Envelope::decode(&serde_json::to_vec(&v).unwrap()),
            Err(EnvelopeError::Malformed(_))
        ));
    }

    #[test]
    fn next_attempt_keeps_identity() {
        let env = Envelope::new("diag.noop", json!({"a": 1}));
        let next = env.next_attempt();
        assert_eq!((next.id, next.attempt, next.args), (env.id, 2, env.args));
    }
}
