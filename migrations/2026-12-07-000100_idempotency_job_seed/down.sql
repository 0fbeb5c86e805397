ALTER TABLE idempotency_keys DROP COLUMN job_seed;
