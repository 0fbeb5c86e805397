//! The message every queue carries: one job, versioned.
//!
//! The `id` is the job's identity everywhere (job record, status URL, dedup key).
//! A consumer that meets an envelope version it does not know must dead-letter
//! it with the reason rather than guess or drop it; [`Envelope::decode`] says
//! which failure happened so the worker can record it. It also refuses what
//! the job's record could never hold (U+0000, a task name longer than
//! [`MAX_TASK_NAME_LEN`], a time before PostgreSQL's earliest), as any
//! producer can publish to a queue: such a row would fail each time the worker
//! tried to commit it.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use crate::catalogue::MAX_TASK_NAME_LEN;

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

/// Longest `tracestate` carried (W3C allows 32 members of up to 256 bytes; we
/// keep the usual 512-byte propagation limit).
const MAX_TRACESTATE_LEN: usize = 512;

impl TraceContext {
    /// The context of a request's `traceparent` (and `tracestate`) headers, or
    /// `None` when `traceparent` is not a valid W3C trace context: as the
    /// specification asks, an invalid one is ignored, not an error. A
    /// `tracestate` is kept only beside a valid `traceparent` and only when it
    /// is at most 512 visible ASCII characters.
    ///
    /// Valid: `version-traceid-parentid-flags` in lowercase hex (2-32-16-2
    /// digits), version not `ff`, trace and parent ids not all zeros; version
    /// `00` has exactly these four fields, a later version may append more.
    pub fn parse(traceparent: &str, tracestate: Option<&str>) -> Option<Self> {
        let valid = traceparent.len() >= 55 && {
            let fields: Vec<&str> = traceparent.splitn(5, '-').collect();
            let hex = |s: &str, len: usize| {
                s.len() == len && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
            };
            let not_zero = |s: &str| s.bytes().any(|b| b != b'0');
            match fields.as_slice() {
                [version, trace_id, parent_id, flags, rest @ ..] => {
                    hex(version, 2)
                        && *version != "ff"
                        && hex(trace_id, 32)
                        && not_zero(trace_id)
                        && hex(parent_id, 16)
                        && not_zero(parent_id)
                        && hex(flags, 2)
                        && (rest.is_empty() || *version != "00")
                }
                _ => false,
            }
        };
        valid.then(|| Self {
            traceparent: traceparent.to_owned(),
            tracestate: tracestate
                .filter(|s| {
                    s.len() <= MAX_TRACESTATE_LEN && s.bytes().all(|b| (0x20..0x7f).contains(&b))
                })
                .map(str::to_owned),
        })
    }

    /// The 32-hex-digit trace id (the second field of `traceparent`).
    pub fn trace_id(&self) -> &str {
        self.traceparent.get(3..35).unwrap_or("")
    }
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
    /// A string in the envelope holds U+0000, which the job's record could
    /// never store (see [`crate::nul`]).
    #[error("the envelope's text at {pointer} holds the NUL character (U+0000)")]
    NulCharacter {
        /// JSON pointer to the string.
        pointer: String,
    },
    /// The task name is longer than any task's may be: the job's record
    /// could not be indexed.
    #[error(
        "the envelope's task name is {len} bytes long; at most {MAX_TASK_NAME_LEN} are allowed"
    )]
    TaskNameTooLong {
        /// The name's length in bytes.
        len: usize,
    },
    /// A time PostgreSQL's `timestamptz` cannot hold (see [`crate::timestamptz`]).
    #[error(
        "the envelope's {field} {at} is before {}, the earliest time PostgreSQL stores",
        crate::timestamptz::EARLIEST
    )]
    TimeOutOfRange {
        /// The field: `enqueued_at` or `not_before`.
        field: &'static str,
        /// The time, as RFC 3339.
        at: String,
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

    /// Reads an envelope. A message from a newer producer is reported as such
    /// (by its version) rather than as garbage, whatever its shape. One the
    /// ingress would never publish, but any producer can, is refused, as its
    /// record could never be written: text holding U+0000, a task name over
    /// [`MAX_TASK_NAME_LEN`] bytes, an `enqueued_at` or `not_before` before
    /// 4714 BC.
    ///
    /// The body is parsed once; only a body that does not parse is read again,
    /// for its version alone.
    pub fn decode(bytes: &[u8]) -> Result<Self, EnvelopeError> {
        #[derive(Deserialize)]
        struct VersionOnly {
            version: u64,
        }
        let unsupported = |found: u64| EnvelopeError::UnsupportedVersion { found };
        match serde_json::from_slice::<Self>(bytes) {
            Ok(envelope) if envelope.version == ENVELOPE_VERSION => {
                if let Some(pointer) = crate::nul::nul_character_at(bytes) {
                    return Err(EnvelopeError::NulCharacter { pointer });
                }
                envelope.storable()?;
                Ok(envelope)
            }
            Ok(envelope) => Err(unsupported(u64::from(envelope.version))),
            Err(err) => match serde_json::from_slice::<VersionOnly>(bytes) {
                Ok(VersionOnly { version }) if version != u64::from(ENVELOPE_VERSION) => {
                    Err(unsupported(version))
                }
                _ => Err(err.into()),
            },
        }
    }

    /// Checks the task name's length and the times against what the job's
    /// record can hold.
    fn storable(&self) -> Result<(), EnvelopeError> {
        if self.task.len() > MAX_TASK_NAME_LEN {
            return Err(EnvelopeError::TaskNameTooLong {
                len: self.task.len(),
            });
        }
        let times = [
            ("enqueued_at", Some(self.enqueued_at)),
            ("not_before", self.not_before),
        ];
        for (field, at) in times {
            if let Some(at) = at.filter(|at| !crate::timestamptz::holds(*at)) {
                return Err(EnvelopeError::TimeOutOfRange {
                    field,
                    at: at.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true),
                });
            }
        }
        Ok(())
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
    fn refuses_text_holding_nul() {
        let mut envelope = Envelope::new("diag.noop", json!({"note": "a\u{0}b"}));
        assert!(matches!(
            Envelope::decode(&envelope.encode()),
            Err(EnvelopeError::NulCharacter { pointer }) if pointer == "/args/note"
        ));
        envelope.args = json!({"note": "a\\u0000b"});
        assert!(Envelope::decode(&envelope.encode()).is_ok());
    }

    #[test]
    fn refuses_a_task_name_over_the_bound() {
        let longest = Envelope::new("t".repeat(MAX_TASK_NAME_LEN), json!({}));
        assert!(Envelope::decode(&longest.encode()).is_ok());
        let over = Envelope::new("é".repeat(MAX_TASK_NAME_LEN / 2 + 1), json!({}));
        let err = Envelope::decode(&over.encode()).unwrap_err();
        assert!(
            matches!(err, EnvelopeError::TaskNameTooLong { len } if len == MAX_TASK_NAME_LEN + 2),
            "{err}"
        );
        assert_eq!(
            err.to_string(),
            "the envelope's task name is 202 bytes long; at most 200 are allowed"
        );
    }

    #[test]
    fn refuses_times_postgres_cannot_hold() {
        let at = |year: i32, month: u32, day: u32| {
            chrono::NaiveDate::from_ymd_opt(year, month, day)
                .unwrap()
                .and_hms_opt(0, 0, 0)
                .unwrap()
                .and_utc()
        };
        let mut envelope = Envelope::new("diag.noop", json!({}));
        envelope.enqueued_at = at(-4713, 11, 24);
        assert_eq!(Envelope::decode(&envelope.encode()).unwrap(), envelope);
        envelope.enqueued_at = at(-100_000, 1, 1);
        assert_eq!(
            Envelope::decode(&envelope.encode())
                .unwrap_err()
                .to_string(),
            "the envelope's enqueued_at -100000-01-01T00:00:00Z is before \
             4714-11-24 00:00:00 UTC BC, the earliest time PostgreSQL stores"
        );
        envelope.enqueued_at = Utc::now();
        envelope.not_before = Some(at(-4713, 11, 23));
        assert!(matches!(
            Envelope::decode(&envelope.encode()),
            Err(EnvelopeError::TimeOutOfRange {
                field: "not_before",
                ..
            })
        ));
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
    fn trace_context_accepts_valid_traceparents_only() {
        let valid = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let trace = TraceContext::parse(valid, Some("congo=t61rcWkgMzE")).unwrap();
        assert_eq!(trace.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(trace.tracestate.as_deref(), Some("congo=t61rcWkgMzE"));
        // A later version may carry more fields.
        assert!(TraceContext::parse(&format!("01{}-extra", &valid[2..]), None).is_some());
        for invalid in [
            "",
            "garbage",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e473-600f067aa0ba902b7-01",
        ] {
            assert!(TraceContext::parse(invalid, None).is_none(), "{invalid}");
        }
        let long_state = "a=".to_owned() + &"b".repeat(600);
        assert_eq!(
            TraceContext::parse(valid, Some(&long_state))
                .unwrap()
                .tracestate,
            None
        );
    }

    #[test]
    fn next_attempt_keeps_identity() {
        let env = Envelope::new("diag.noop", json!({"a": 1}));
        let next = env.next_attempt();
        assert_eq!((next.id, next.attempt, next.args), (env.id, 2, env.args));
    }
}
