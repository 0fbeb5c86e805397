//! The ingress's queue monitor and what it reads: heartbeats carry the
//! database's time, not the worker's.

use std::time::Duration;

use chrono::{DateTime, Utc};
use diesel::prelude::*;

use crate::harness::TestDb;

/// A heartbeat's `last_seen_at` (and a stop's `stopped_at`) is the database's
/// `now()`, never the worker's clock. Inside a transaction the database's
/// `now()` stays at the transaction's start while the writer's clock moves on,
/// so a beat written 1.1 s in comes from a writer whose clock is 1.1 s off the
/// database's; it must still be recorded at the database's time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_heartbeat_is_recorded_at_the_database_time() {
    use conveyor_schema::db::workers;
    use conveyor_worker::heartbeat::{Identity, record};

    #[derive(QueryableByName)]
    struct Now {
        #[diesel(sql_type = diesel::sql_types::Timestamptz)]
        now: DateTime<Utc>,
    }

    let db = tokio::task::spawn_blocking(TestDb::create).await.unwrap();
    tokio::task::spawn_blocking(move || {
        let mut conn = db.conn();
        let me = Identity {
            id: "host:1:abc".into(),
            host: "host".into(),
            queues: vec!["default".into()],
            started_at: Utc::now(),
        };
        conn.transaction::<_, diesel::result::Error, _>(|conn| {
            let db_now = diesel::sql_query("SELECT now() AS now")
                .get_result::<Now>(conn)?
                .now;
            std::thread::sleep(Duration::from_millis(1_100));
            let seen = |conn: &mut PgConnection| {
                workers::table
                    .select((
                        workers::last_seen_at,
                        workers::stopped_at,
                        workers::in_flight,
                    ))
                    .first::<(DateTime<Utc>, Option<DateTime<Utc>>, i32)>(conn)
            };
            record(conn, &me, 3, false)?;
            assert_eq!(seen(conn)?, (db_now, None, 3));
            record(conn, &me, 0, true)?;
            assert_eq!(seen(conn)?, (db_now, Some(db_now), 0));
            Ok(())
        })
        .unwrap();
    })
    .await
    .unwrap();
}
