//! The operator dashboard at `/dashboard`: server-rendered minijinja pages
//! (queues, workers, job search, dead jobs with replay and discard, campaigns,
//! schedules), behind an `admin` API key ([`crate::auth`]).
//!
//! Templates live in `templates/dashboard/` and are compiled into the binary,
//! so the ingress needs no files at run time and the pages load nothing from
//! other hosts. Each page refreshes itself: a few lines of embedded JavaScript
//! fetch the page with `?fragment=1` every few seconds, which renders only its
//! `content` block, and swap it in.

mod dead;
mod pages;

use std::sync::OnceLock;

use axum::Router;
use axum::extract::{Form, Query};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use minijinja::Environment;
use serde::{Deserialize, Serialize};

use crate::admin_auth::{ACTOR_COOKIE, TOKEN_COOKIE};
use crate::state::AppState;

/// The pages in the navigation bar, in order.
const NAV: [&str; 6] = [
    "queues",
    "workers",
    "jobs",
    "dead",
    "campaigns",
    "schedules",
];

const TEMPLATES: [(&str, &str); 9] = [
    (
        "base.html",
        include_str!("../../../templates/dashboard/base.html"),
    ),
    (
        "login.html",
        include_str!("../../../templates/dashboard/login.html"),
    ),
    (
        "queues.html",
        include_str!("../../../templates/dashboard/queues.html"),
    ),
    (
        "workers.html",
        include_str!("../../../templates/dashboard/workers.html"),
    ),
    (
        "jobs.html",
        include_str!("../../../templates/dashboard/jobs.html"),
    ),
    (
        "dead.html",
        include_str!("../../../templates/dashboard/dead.html"),
    ),
    (
        "dead_job.html",
        include_str!("../../../templates/dashboard/dead_job.html"),
    ),
    (
        "schedules.html",
        include_str!("../../../templates/dashboard/schedules.html"),
    ),
    (
        "table.html",
        include_str!("../../../templates/dashboard/table.html"),
    ),
];

fn environment() -> &'static Environment<'static> {
    static ENV: OnceLock<Environment<'static>> = OnceLock::new();
    ENV.get_or_init(|| {
        let mut env = Environment::new();
        for (name, source) in TEMPLATES {
            // The templates are constants checked by the dashboard tests.
            if let Err(err) = env.add_template(name, source) {
                tracing::error!(template = name, error = %err, "dashboard template does not compile");
            }
        }
        env
    })
}

/// `?fragment=1` asks for the content block alone (auto-refresh).
#[derive(Debug, Default, Deserialize)]
pub struct Fragment {
    /// Render only the `content` block.
    #[serde(default)]
    pub fragment: Option<String>,
}

/// Renders `template` for page `page` with `context`; the `content` block alone for fragments.
fn render(template: &str, page: &str, fragment: bool, context: impl Serialize) -> Response {
    let env = environment();
    let ctx = minijinja::context! { page => page, nav => NAV, ..minijinja::Value::from_serialize(&context) };
    let rendered = env.get_template(template).and_then(|tmpl| {
        if fragment {
            tmpl.render_captured_to(&ctx, std::io::sink())?
                .with_state_mut(|state| state.render_block("content"))
        } else {
            tmpl.render(&ctx)
        }
    });
    match rendered {
        Ok(html) => Html(html).into_response(),
        Err(err) => {
            tracing::error!(template, error = %err, "dashboard page failed to render");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                "the page failed to render",
            )
                .into_response()
        }
    }
}

/// The dashboard's routes: the login form is open, everything else needs an `admin` key ([`crate::auth::guard`]).
pub fn router() -> Router<AppState> {
    let protected = Router::new()
        .route(
            "/dashboard",
            get(|| async { Redirect::to("/dashboard/queues") }),
        )
        .route("/dashboard/queues", get(pages::queues))
        .route("/dashboard/workers", get(pages::workers))
        .route("/dashboard/jobs", get(pages::jobs))
        .route("/dashboard/dead", get(dead::dead))
        .route("/dashboard/dead/{id}", get(dead::dead_job))
        .route("/dashboard/dead/{id}/replay", post(dead::replay))
        .route("/dashboard/dead/{id}/discard", post(dead::discard))
        .route("/dashboard/campaigns", get(pages::campaigns))
        .route("/dashboard/schedules", get(pages::schedules));
    Router::new()
        .route("/dashboard/login", get(login_form).post(login))
        .merge(protected)
}

async fn login_form(Query(_): Query<Fragment>) -> Response {
    render(
        "login.html",
        "login",
        false,
        minijinja::context! { error => () },
    )
}

/// The login form's fields.
#[derive(Debug, Deserialize)]
pub struct Login {
    /// The operator's name, recorded in audits.
    pub name: String,
    /// An API key with the `admin` scope.
    pub token: String,
}

async fn login(
    axum::extract::State(state): axum::extract::State<AppState>,
    Form(form): Form<Login>,
) -> Response {
    let is_admin = matches!(
        state.auth.verify(form.token.trim()).await,
        Ok(principal) if principal.has("admin")
    );
    if !is_admin {
        let mut response = render(
            "login.html",
            "login",
            false,
            minijinja::context! { error => "That is not a valid API key with the admin scope." },
        );
        *response.status_mut() = StatusCode::UNAUTHORIZED;
        return response;
    }
    let name: String = form
        .name
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | '@'))
        .take(64)
        .collect();
    let mut headers = HeaderMap::new();
    for cookie in [
        format!(
            "{TOKEN_COOKIE}={}; Path=/; HttpOnly; SameSite=Strict",
            form.token.trim()
        ),
        format!("{ACTOR_COOKIE}={name}; Path=/; HttpOnly; SameSite=Strict"),
    ] {
        if let Ok(value) = HeaderValue::from_str(&cookie) {
            headers.append(header::SET_COOKIE, value);
        }
    }
    (headers, Redirect::to("/dashboard/queues")).into_response()
}
