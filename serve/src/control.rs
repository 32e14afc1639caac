//! The control plane's HTTP endpoints (with `--xds`), on the HTTP listener:
//!
//! - `GET /v1/rollout`: the fleet's state (versions kept, the target, any
//!   canary, per node what was sent, ACKed and NACKed, and when);
//! - `POST /v1/rollout` `{"version"?, "nodes"?, "fraction"?}`: a version
//!   (default: the source's) to the nodes matching `nodes` (`*` wildcards)
//!   or to `fraction` of the connected nodes, or to all;
//! - `POST /v1/rollback` `{"version"?}`: the fleet back to a kept version
//!   (default: the target before this one);
//! - `GET /metrics`: the control plane's series (Prometheus text).
//!
//! Without `--xds` these answer 404. The answers of both POSTs are the new
//! state, as `GET /v1/rollout` shows it.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State as Extract;
use axum::http::StatusCode;
use axum::response::Response;
use serde::Deserialize;

use crate::http::{error, json};
use crate::rollout::Selector;
use crate::{log, State};

const OFF: &str = "the control plane is off (start `tenantgate serve` with `--xds`)";

fn off() -> Response {
    error(StatusCode::NOT_FOUND, "not_found", OFF)
}

fn bad(message: impl Into<String>) -> Response {
    error(StatusCode::BAD_REQUEST, "bad_request", message)
}

pub async fn status(Extract(state): Extract<Arc<State>>) -> Response {
    match state.plane() {
        Some(p) => json(StatusCode::OK, &p.fleet().status()),
        None => off(),
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RolloutBody {
    version: Option<String>,
    nodes: Option<String>,
    fraction: Option<f64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RollbackBody {
    version: Option<String>,
}

/// An empty body is `{}`.
fn body<T: Default + for<'de> Deserialize<'de>>(b: &Bytes) -> Result<T, String> {
    if b.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(b).map_err(|e| format!("the body is not a request: {e}"))
}

pub async fn rollout(Extract(state): Extract<Arc<State>>, b: Bytes) -> Response {
    let Some(p) = state.plane() else {
        return off();
    };
    let req: RolloutBody = match body(&b) {
        Ok(r) => r,
        Err(m) => return bad(m),
    };
    let selector = match (req.nodes, req.fraction) {
        (Some(_), Some(_)) => return bad("give `nodes` or `fraction`, not both"),
        (Some(n), None) => Some(Selector::Pattern(n)),
        (None, Some(f)) => Some(Selector::Fraction(f)),
        (None, None) => None,
    };
    let to = match &selector {
        None => "every node".to_string(),
        Some(Selector::Pattern(p)) => format!("the nodes matching `{p}`"),
        Some(Selector::Fraction(f)) => format!("{f} of the connected nodes"),
    };
    let result = p.fleet().rollout(req.version.as_deref(), selector);
    match result {
        Ok(version) => {
            p.notify();
            log(format!("rollout: {version} to {to}"));
            json(StatusCode::OK, &p.fleet().status())
        }
        Err(m) => bad(m),
    }
}

pub async fn rollback(Extract(state): Extract<Arc<State>>, b: Bytes) -> Response {
    let Some(p) = state.plane() else {
        return off();
    };
    let req: RollbackBody = match body(&b) {
        Ok(r) => r,
        Err(m) => return bad(m),
    };
    let result = p.fleet().rollback(req.version.as_deref());
    match result {
        Ok(v) => {
            p.notify();
            log(format!("rollback: every node to {v}"));
            json(StatusCode::OK, &p.fleet().status())
        }
        Err(m) => bad(m),
    }
}
