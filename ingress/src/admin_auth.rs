//! Admin identity for `/v1/admin/*` and `/dashboard/*`: the cookies the
//! dashboard's login form sets and the [`Actor`] recorded in audits.
//!
//! Access itself is an API key with the `admin` scope, checked by
//! [`crate::auth::guard`]: sent as `Authorization: Bearer <key>`, or for
//! dashboard pages held in the `conveyor_admin` cookie that the login form sets
//! (HttpOnly, SameSite=Strict, which also keeps other sites from submitting the
//! dashboard's forms).
//!
//! The actor recorded in audits is the `X-Conveyor-Actor` header, or the name
//! typed into the login form, or the key's producer.

use axum::http::{HeaderMap, header};

/// Cookie holding the admin API key.
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
