//! Conveyor's integration tests: one binary, real PostgreSQL, RabbitMQ and SMTP.
//!
//! Every test gets its own database (a copy of a migrated template, dropped
//! afterwards) and its own broker namespace (queues deleted afterwards), so
//! tests run in parallel and leave nothing behind. Set `TEST_LOG=1` to see logs.

mod gate;
mod harness;
mod smtp;

mod auth;
mod broker_faults;
mod campaign_owners;
mod cluster;
mod dashboard;
mod dead_letters;
mod delivery_limit_resets;
mod deploy;
mod deploy_files;
mod dlq;
mod dlq_bulk;
mod dlq_carry_on;
mod docs;
mod drain;
mod fuzz;
mod hardening;
mod http_errors;
mod idempotency;
mod in_doubt;
mod job_batches;
mod jobs;
mod local_broker_repair;
mod local_services;
mod logs;
mod mail;
mod mail_api;
mod mail_outcomes;
mod mail_pause;
mod mail_rate;
mod mail_record_retry;
mod mail_refusals;
mod mail_transitions;
mod make_run;
mod make_run_services;
mod metrics;
mod migration_failures;
mod migrations;
mod monitor;
mod openapi;
mod publish_failures;
mod refused_rows;
mod retention_budget;
mod runner;
mod schedules;
mod stats;
mod teardown;
mod webdriver;
mod webhooks;
mod worker_behaviour;
mod worker_readiness;
