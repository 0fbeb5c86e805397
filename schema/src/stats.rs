//! Names shared by the rollup tasks that write statistics and the API that
//! reads them: the granularities and the table of each family.

use serde::{Deserialize, Serialize};

/// The width of a rollup window. Windows are aligned to UTC hours and days.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Granularity {
    /// One UTC hour.
    Hour,
    /// One UTC day.
    Day,
}

impl Granularity {
    /// The `date_trunc` unit.
    pub fn unit(self) -> &'static str {
        match self {
            Self::Hour => "hour",
            Self::Day => "day",
        }
    }

    /// The window's length.
    pub fn duration(self) -> chrono::Duration {
        match self {
            Self::Hour => chrono::Duration::hours(1),
            Self::Day => chrono::Duration::days(1),
        }
    }

    fn suffix(self) -> &'static str {
        match self {
            Self::Hour => "hourly",
            Self::Day => "daily",
        }
    }
}

/// What a rollup counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    /// Job runs per task, from `jobs`.
    Jobs,
    /// Mail deliveries per campaign, from `campaign_recipients`.
    Mail,
    /// Webhook events per source, outcome and reason, from `webhook_events`.
    Webhooks,
}

impl Family {
    /// The rollup table of this family at `granularity`, e.g. `job_stats_hourly`.
    pub fn table(self, granularity: Granularity) -> &'static str {
        match (self, granularity.suffix()) {
            (Self::Jobs, "hourly") => "job_stats_hourly",
            (Self::Jobs, _) => "job_stats_daily",
            (Self::Mail, "hourly") => "mail_stats_hourly",
            (Self::Mail, _) => "mail_stats_daily",
            (Self::Webhooks, "hourly") => "webhook_stats_hourly",
            (Self::Webhooks, _) => "webhook_stats_daily",
        }
    }

    /// The raw table it is computed from.
    pub fn source_table(self) -> &'static str {
        match self {
            Self::Jobs => "jobs",
            Self::Mail => "campaign_recipients",
            Self::Webhooks => "webhook_events",
        }
    }
}
