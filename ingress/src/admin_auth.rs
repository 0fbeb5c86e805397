//! Admin authentication for `/v1/admin/*` and `/dashboard/*`.
//!
//! Interim: one shared token from `[admin] token`, sent as
//! `Authorization: Bearer <token>` or held in the `conveyor_admin` cookie that the
//! dashboard's login form sets (HttpOnly, SameSite=Strict, which also keeps
//! other sites from submitting the dashboard's forms). This moves to API keys
//! with the `admin` scope once those exist. Without a configured token the
//! admin surface answers 403, so it is never open by accident.
//!
//! The actor recorded in audits is the `X-Conveyor-Actor` header, or the name
//! typed into the login form, or `admin`.

use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Redirect, Response};
use secrecy::ExposeSecret;

use crate::problem::Problem;
use crate::state::AppState;

/// Cookie holding the admin token.
pub const TOKEN_COOKIE: &str = "conveyor_admin";
/// Cookie holding the operator's name.
pub const ACTOR_COOKIE: &str = "conveyor_actor";

/// Who is acting, for audits; set on every authenticated admin request.
#[derive(Debug, Clone)]
pub struct Actor(pub String);

/// The value of cookie `name`, if sent.
pub fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// True when `given` equals the configured token (compared in constant time).
pub fn token_matches(state: &AppState, given: &str) -> bool {
    let Some(expected) = &state.admin_token else {
        return false;
    };
    let (a, b) = (expected.expose_secret().as_bytes(), given.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn presented(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .or_else(|| cookie(headers, TOKEN_COOKIE))
}

/// Middleware: lets the request through with an [`Actor`] when authenticated;
/// otherwise 401/403 problems for the API and a redirect to the login form for pages.
pub async fn require_admin(
    State(state): State<AppState>,
    mut request: Request,
    next: Next,
) -> Response {
    let is_page = request.uri().path().starts_with("/dashboard");
    if state.admin_token.is_none() {
        return Problem::new(
            StatusCode::FORBIDDEN,
            "admin-disabled",
            "Admin access disabled",
            "set `admin.token` (CONVEYOR_ADMIN_TOKEN) to enable the admin API and dashboard",
        )
        .into_response();
    }
    let headers = request.headers();
    let authenticated = presented(headers).is_some_and(|t| token_matches(&state, t));
    if !authenticated {
        if is_page {
            return Redirect::to("/dashboard/login").into_response();
        }
        let mut response = Problem::new(
            StatusCode::UNAUTHORIZED,
            "unauthenticated",
            "Authentication required",
            "send `Authorization: Bearer <admin token>`",
        )
        .into_response();
        response.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static("Bearer"),
        );
        return response;
    }
    let actor = headers
        .get("x-conveyor-actor")
        .and_then(|v| v.to_str().ok())
        .or_else(|| cookie(headers, ACTOR_COOKIE))
        .filter(|name| !name.is_empty())
        .map_or_else(
            || "admin".to_owned(),
            |name| name.chars().take(100).collect(),
        );
    request.extensions_mut().insert(Actor(actor));
    next.run(request).await
}
