//! Who is calling and what they may do: API keys with scopes, checked on every
//! `/v1` route (except `/v1/webhooks/*`, which authenticate by signature) and on
//! the dashboard, then a per-key token bucket.
//!
//! Order of checks: missing, malformed, unknown, expired or revoked key → 401;
//! a scope that does not cover the route → 403; an empty bucket → 429 with
//! `Retry-After`; Postgres unreachable while looking a key up → 503. Every
//! answer is problem+json (dashboard pages redirect to the login form instead
//! of a 401). The key itself is never logged: only its id reaches spans.
//!
//! Which scope each route needs is [`need`]; `POST /v1/jobs` and
//! `POST /v1/jobs/batch` further check each task against the key's `enqueue:`
//! globs in the handler ([`Principal::may_enqueue`]), before anything is
//! recorded or published. A batch takes one token per job
//! ([`Auth::take_for_jobs`]).

pub mod cache;
pub mod keys;
pub mod rate;

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Redirect, Response};
use chrono::Utc;
use conveyor_platform::config::AuthConfig;
use conveyor_schema::pool::PgPool;

use crate::admin_auth::{ACTOR_COOKIE, Actor, TOKEN_COOKIE, cookie};
use crate::problem::Problem;
use crate::state::AppState;

/// The authenticated caller, set as a request extension on every authenticated request.
#[derive(Debug, Clone)]
pub struct Principal {
    /// The key's id (not secret; safe to log).
    pub key_id: String,
    /// The producer the key belongs to.
    pub producer: String,
    /// Granted scopes.
    pub scopes: Arc<[String]>,
    /// The key's rate: tokens per second into its bucket.
    pub rate_per_sec: f64,
    /// The key's bucket size.
    pub burst: u32,
}

impl Principal {
    /// True when the key holds `scope` or `admin`.
    pub fn has(&self, scope: &str) -> bool {
        self.scopes.iter().any(|s| s == scope || s == "admin")
    }

    /// True when an `enqueue:<glob>` scope (or `admin`) covers `task`.
    pub fn may_enqueue(&self, task: &str) -> bool {
        self.scopes.iter().any(|s| {
            s == "admin"
                || s.strip_prefix("enqueue:")
                    .is_some_and(|glob| keys::glob_matches(glob, task))
        })
    }

    fn may_enqueue_something(&self) -> bool {
        self.scopes
            .iter()
            .any(|s| s == "admin" || s.starts_with("enqueue:"))
    }
}

/// Key lookup and rate limiting, shared by all requests.
#[derive(Clone)]
pub struct Auth {
    /// Key rows, cached briefly.
    cache: cache::KeyCache,
    /// Token buckets.
    limits: rate::RateLimits,
    /// Defaults for keys without their own rate.
    default_rate: f64,
    /// Defaults for keys without their own burst.
    default_burst: u32,
}

/// Why a presented key was refused.
#[derive(Debug, PartialEq, Eq)]
pub enum Refusal {
    /// Missing, malformed, unknown, expired or revoked.
    Unauthenticated(&'static str),
    /// Postgres could not be reached to look the key up.
    Unavailable,
}

impl Auth {
    /// Auth over `db` with the `[auth]` settings.
    pub fn new(db: PgPool, config: &AuthConfig) -> Self {
        Self {
            cache: cache::KeyCache::new(db, Duration::from_millis(config.cache_ttl_ms)),
            limits: rate::RateLimits::new(config.ingress_replicas),
            default_rate: config.default_rate_per_sec,
            default_burst: config.default_burst,
        }
    }

    /// Makes a request that carries `n` jobs spend `n` tokens: takes the
    /// `n - 1` beyond the one [`guard`] took, all at once or none.
    /// [`rate::Short::Exceeds`] when `n` is more than the key's bucket holds,
    /// so no wait would ever let the request through.
    pub fn take_for_jobs(&self, principal: &Principal, n: u32) -> Result<(), rate::Short> {
        let capacity = self.limits.capacity(principal.burst);
        if n > capacity {
            return Err(rate::Short::Exceeds(capacity));
        }
        match std::num::NonZeroU32::new(n.saturating_sub(1)) {
            Some(more) => self.limits.check_n(
                &principal.key_id,
                principal.rate_per_sec,
                principal.burst,
                more,
            ),
            None => Ok(()),
        }
    }

    /// Resolves a presented key to its [`Principal`].
    pub async fn verify(&self, presented: &str) -> Result<Principal, Refusal> {
        let (id, secret) = keys::split(presented).ok_or(Refusal::Unauthenticated(
            "the key is not of the form `cvk_<id>_<secret>`",
        ))?;
        let row = self.cache.get(id).await.map_err(|err| {
            tracing::warn!(error = %err, "cannot look up an API key");
            Refusal::Unavailable
        })?;
        let given = keys::hash_secret(secret);
        let Some(row) = row.filter(|row| keys::hashes_equal(&row.secret_hash, &given)) else {
            return Err(Refusal::Unauthenticated("unknown API key"));
        };
        if row.revoked_at.is_some() {
            return Err(Refusal::Unauthenticated("the API key has been revoked"));
        }
        if row.expires_at.is_some_and(|at| at <= Utc::now()) {
            return Err(Refusal::Unauthenticated("the API key has expired"));
        }
        Ok(Principal {
            key_id: row.id.clone(),
            producer: row.producer.clone(),
            scopes: row.scopes.clone().into(),
            rate_per_sec: row.rate_per_sec.unwrap_or(self.default_rate),
            burst: row
                .burst
                .and_then(|b| u32::try_from(b).ok())
                .unwrap_or(self.default_burst),
        })
    }
}

/// What a route asks of the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// Nothing (probes, metrics, OpenAPI, signed webhooks, the login form).
    Open,
    /// Any valid key (unknown `/v1` paths: authenticate first, then 404).
    AnyKey,
    /// An `enqueue:` scope; the task itself is checked by the handler.
    Enqueue,
    /// The `campaigns` scope.
    Campaigns,
    /// The `webhooks:admin` scope.
    WebhooksAdmin,
    /// The `admin` scope (admin API, schedules, stats).
    Admin,
    /// The `admin` scope, on a dashboard page (cookie accepted, redirects to login).
    AdminPage,
}

/// The requirement of `path`.
pub fn need(path: &str) -> Need {
    let under = |prefix: &str| {
        path == prefix
            || path
                .strip_prefix(prefix)
                .is_some_and(|rest| rest.starts_with('/'))
    };
    if under("/dashboard") {
        return if path == "/dashboard/login" {
            Need::Open
        } else {
            Need::AdminPage
        };
    }
    if !under("/v1") || under("/v1/webhooks") {
        return Need::Open;
    }
    if under("/v1/admin") || under("/v1/schedules") || under("/v1/stats") {
        Need::Admin
    } else if under("/v1/campaigns") {
        Need::Campaigns
    } else if under("/v1/profiles") {
        Need::WebhooksAdmin
    } else if under("/v1/jobs") {
        Need::Enqueue
    } else {
        Need::AnyKey
    }
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim)
}

fn unauthenticated(detail: &str) -> Response {
    let mut response = Problem::new(
        StatusCode::UNAUTHORIZED,
        "unauthenticated",
        "Authentication required",
        format!("{detail}; send `Authorization: Bearer <API key>`"),
    )
    .into_response();
    response
        .headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    response
}

/// 403: the key is valid but its scopes do not cover the request.
pub fn forbidden(detail: impl Into<String>) -> Problem {
    Problem::new(
        StatusCode::FORBIDDEN,
        "insufficient-scope",
        "Insufficient scope",
        detail,
    )
}

/// 429 with `Retry-After` (whole seconds, at least 1).
pub fn too_many(wait: Duration) -> Problem {
    let mut problem = Problem::new(
        StatusCode::TOO_MANY_REQUESTS,
        "rate-limited",
        "Too many requests",
        format!(
            "this key's rate limit is exhausted; retry in {} ms",
            wait.as_millis()
        ),
    );
    problem.retry_after = Some(wait.as_secs_f64().ceil().clamp(1.0, f64::from(u32::MAX)) as u32);
    problem
}

/// Middleware over the whole router: authenticates, checks the route's scope,
/// takes a token, and sets [`Principal`] (and [`Actor`] for admin routes).
pub async fn guard(State(state): State<AppState>, mut request: Request, next: Next) -> Response {
    let need = need(request.uri().path());
    if need == Need::Open {
        return next.run(request).await;
    }
    let headers = request.headers();
    let presented = match need {
        Need::AdminPage => bearer(headers).or_else(|| cookie(headers, TOKEN_COOKIE)),
        _ => bearer(headers),
    };
    let Some(presented) = presented else {
        return match need {
            Need::AdminPage => Redirect::to("/dashboard/login").into_response(),
            _ => unauthenticated("no API key was sent"),
        };
    };
    let principal = match state.auth.verify(presented).await {
        Ok(found) => found,
        Err(Refusal::Unavailable) => {
            return Problem::unavailable("cannot verify the API key: database unavailable", 1)
                .into_response();
        }
        Err(Refusal::Unauthenticated(_)) if need == Need::AdminPage => {
            return Redirect::to("/dashboard/login").into_response();
        }
        Err(Refusal::Unauthenticated(why)) => return unauthenticated(why),
    };
    let allowed = match need {
        Need::Open | Need::AnyKey => true,
        Need::Enqueue => principal.may_enqueue_something(),
        Need::Campaigns => principal.has("campaigns"),
        Need::WebhooksAdmin => principal.has("webhooks:admin"),
        Need::Admin | Need::AdminPage => principal.has("admin"),
    };
    if !allowed {
        let wanted = match need {
            Need::Enqueue => "an `enqueue:` scope",
            Need::Campaigns => "the `campaigns` scope",
            Need::WebhooksAdmin => "the `webhooks:admin` scope",
            _ => "the `admin` scope",
        };
        return forbidden(format!(
            "key {} (producer `{}`) lacks {wanted}",
            principal.key_id, principal.producer
        ))
        .into_response();
    }
    if let Err(wait) =
        state
            .auth
            .limits
            .check(&principal.key_id, principal.rate_per_sec, principal.burst)
    {
        return too_many(wait).into_response();
    }
    if matches!(need, Need::Admin | Need::AdminPage) {
        let headers = request.headers();
        let actor = headers
            .get("x-conveyor-actor")
            .and_then(|v| v.to_str().ok())
            .or_else(|| cookie(headers, ACTOR_COOKIE))
            .filter(|name| !name.is_empty())
            .map_or_else(
                || principal.producer.clone(),
                |name| name.chars().take(100).collect(),
            );
        request.extensions_mut().insert(Actor(actor));
    }
    request.extensions_mut().insert(principal);
    next.run(request).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_and_scopes() {
        assert_eq!(need("/healthz"), Need::Open);
        assert_eq!(need("/openapi.json"), Need::Open);
        assert_eq!(need("/v1/webhooks/crm/profiles"), Need::Open);
        assert_eq!(need("/v1/jobs"), Need::Enqueue);
        assert_eq!(need("/v1/jobs/abc"), Need::Enqueue);
        assert_eq!(need("/v1/jobsx"), Need::AnyKey);
        assert_eq!(need("/v1/campaigns/1/send"), Need::Campaigns);
        assert_eq!(need("/v1/profiles/p"), Need::WebhooksAdmin);
        assert_eq!(need("/v1/stats/mail"), Need::Admin);
        assert_eq!(need("/v1/admin/queues"), Need::Admin);
        assert_eq!(need("/dashboard/login"), Need::Open);
        assert_eq!(need("/dashboard/queues"), Need::AdminPage);
    }
}
