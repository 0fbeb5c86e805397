-- Only the queue monitor's oldest-waiting query read `jobs_waiting`, and it
-- reads `jobs_waiting_since` now. Dropped CONCURRENTLY (outside a transaction,
-- see metadata.toml), so the drop does not wait behind, or block, traffic.
DROP INDEX CONCURRENTLY IF EXISTS jobs_waiting;
