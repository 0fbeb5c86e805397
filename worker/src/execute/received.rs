//! What handling keeps of a delivery: lapin's [`Delivery`] is taken apart on
//! arrival.

use conveyor_platform::amqp::PRODUCER_HEADER;
use conveyor_schema::nul::without_nul;
use lapin::BasicProperties;
use lapin::message::Delivery;
use uuid::Uuid;

use crate::dead_letters::resets::LIMIT_RESETS_HEADER;

/// What handling needs of a delivery. The rest of lapin's [`Delivery`] (its
/// properties, exchange, routing key and acker: about 400 bytes) is dropped on
/// arrival, so it is not carried, and copied, with every job's future.
pub struct Received {
    /// The channel's delivery tag.
    pub tag: u64,
    /// The broker delivered this message before (a worker died or disconnected holding it).
    pub redelivered: bool,
    /// The `message_id` property as a job id, for naming an unreadable message.
    pub message_id: Option<Uuid>,
    /// The producer that enqueued the job, from [`PRODUCER_HEADER`] (U+0000
    /// replaced, as PostgreSQL stores no such text).
    pub producer: Option<String>,
    /// The body: an encoded [`Envelope`].
    pub data: Vec<u8>,
    /// Returned to its queue after the broker's delivery limit (it carries
    /// [`LIMIT_RESETS_HEADER`]), so possibly one of two copies.
    pub limit_reset: bool,
}

impl From<Delivery> for Received {
    fn from(delivery: Delivery) -> Self {
        let message_id = message_id(&delivery.properties);
        let headers = delivery.properties.headers().as_ref();
        let limit_reset = headers.is_some_and(|h| h.contains_key(LIMIT_RESETS_HEADER));
        let producer = headers
            .and_then(|headers| headers.inner().get(PRODUCER_HEADER))
            .and_then(|value| value.as_long_string())
            // Any producer can set the header: U+0000 in it would make the
            // job's `running` row one PostgreSQL refuses.
            .map(|value| without_nul(&String::from_utf8_lossy(value.as_bytes())).into_owned());
        Self {
            tag: delivery.delivery_tag,
            redelivered: delivery.redelivered,
            message_id,
            producer,
            data: delivery.data,
            limit_reset,
        }
    }
}

/// The `message_id` property as a job id (none when absent, not a UUID, or nil).
pub(crate) fn message_id(properties: &BasicProperties) -> Option<Uuid> {
    properties
        .message_id()
        .as_ref()
        .and_then(|id| Uuid::parse_str(id.as_str()).ok())
        .filter(|id| !id.is_nil())
}
