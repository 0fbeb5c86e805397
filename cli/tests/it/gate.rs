//! Forcing an order of events between processes: a trigger holds back a
//! statement at the racy point until the test opens the [`Gate`], so a race is
//! tested in the order that matters rather than hoped for.

use diesel::PgConnection;
use diesel::connection::SimpleConnection;

use crate::harness::TestApp;

/// The advisory lock (single-key space) a closed [`Gate`] holds. Conveyor's
/// own advisory locks use the two-key space, or other keys, so they never meet it.
const GATE_KEY: i64 = 7_331;

/// Holds back every row change that fires its trigger until [`Gate::open`]:
/// the trigger waits for a shared advisory lock that the gate's own
/// connection holds exclusively, inside the held statement's transaction.
pub struct Gate {
    conn: PgConnection,
}

impl Gate {
    /// Installs a `BEFORE {event}` row trigger on `table` that waits at the
    /// gate whenever `condition` (PL/pgSQL over `NEW` and `OLD`; `true` for
    /// every row) holds, and closes the gate.
    pub fn close(app: &TestApp, table: &str, event: &str, condition: &str) -> Self {
        let mut conn = app.db.conn();
        conn.batch_execute(&format!(
            "SELECT pg_advisory_lock({GATE_KEY});
             CREATE FUNCTION gate() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN
                 IF {condition} THEN
                     PERFORM pg_advisory_xact_lock_shared({GATE_KEY});
                 END IF;
                 RETURN NEW;
             END $$;
             CREATE TRIGGER gate BEFORE {event} ON {table}
                 FOR EACH ROW EXECUTE FUNCTION gate();"
        ))
        .expect("close the gate");
        Self { conn }
    }

    /// Lets the held statements, and every later one, through.
    pub fn open(mut self) {
        self.conn
            .batch_execute(&format!("SELECT pg_advisory_unlock({GATE_KEY})"))
            .expect("open the gate");
    }
}

/// Sessions of the test's database waiting for an advisory lock: at a closed
/// [`Gate`], or for one of Conveyor's own advisory locks.
pub async fn advisory_waits(app: &TestApp) -> i64 {
    app.count(
        "SELECT count(*) AS n FROM pg_stat_activity
          WHERE datname = current_database() AND wait_event_type = 'Lock' AND wait_event = 'advisory'",
    )
    .await
}
