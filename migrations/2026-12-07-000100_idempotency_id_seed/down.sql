ALTER TABLE idempotency_keys DROP COLUMN id_seed;
