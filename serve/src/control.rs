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
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use crate::http::{error, json};
use crate::rollout::Selector;
use crate::xds::Plane;
use crate::{log, State};

fn plane(state: &State) -> Result<&Arc<Plane>, Response> {
    state.plane().ok_or_else(|| {
        error(
            StatusCode::NOT_FOUND,
            "not_found",
            "the control plane is off (start `tenantgate serve` with `--xds`)",
        )
    })
}

pub async fn status(Extract(state): Extract<Arc<State>>) -> Response {
    match plane(&state) {
        Ok(p) => json(StatusCode::OK, &p.fleet().status()),
        Err(r) => r,
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
fn body<T: Default + for<'de> Deserialize<'de>>(b: &Bytes) -> Result<T, Response> {
    if b.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(b).map_err(|e| {
        error(
            StatusCode::BAD_REQUEST,
            "bad_request",
            format!("the body is not a request: {e}"),
        )
    })
}

pub async fn rollout(Extract(state): Extract<Arc<State>>, b: Bytes) -> Response {
    let p = match plane(&state) {
        Ok(p) => p,
        Err(r) => return r,
    };
    let req: RolloutBody = match body(&b) {
        Ok(r) => r,
        Err(r) => return r,
    };
    let selector = match (req.nodes, req.fraction) {
        (Some(_), Some(_)) => {
            return error(
                StatusCode::BAD_REQUEST,
                "bad_request",
                "give `nodes` or `fraction`, not both",
            )
        }
        (Some(n), None) => Some(Selector::Pattern(n)),
        (None, Some(f)) => Some(Selector::Fraction(f)),
        (None, None) => None,
    };
    let shown = format!("{selector:?}");
    let result = p.fleet().rollout(req.version.as_deref(), selector);
    match result {
        Ok(()) => {
            p.notify();
            let s = p.fleet().status();
            log(format!(
                "rollout: {} to {}",
                s["canary"]["version"]
                    .as_str()
                    .or(s["target"].as_str())
                    .unwrap_or(""),
                if shown == "None" {
                    "every node".to_string()
                } else {
                    shown
                }
            ));
            json(StatusCode::OK, &s)
        }
        Err(m) => error(StatusCode::BAD_REQUEST, "bad_request", m),
    }
}

pub async fn rollback(Extract(state): Extract<Arc<State>>, b: Bytes) -> Response {
    let p = match plane(&state) {
        Ok(p) => p,
        Err(r) => return r,
    };
    let req: RollbackBody = match body(&b) {
        Ok(r) => r,
        Err(r) => return r,
    };
    let result = p.fleet().rollback(req.version.as_deref());
    match result {
        Ok(v) => {
            p.notify();
            log(format!("rollback: every node to {v}"));
            json(StatusCode::OK, &p.fleet().status())
        }
        Err(m) => error(StatusCode::BAD_REQUEST, "bad_request", m),
    }
}

pub async fn metrics(Extract(state): Extract<Arc<State>>) -> Response {
    match plane(&state) {
        Ok(p) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
            p.fleet().metrics(),
        )
            .into_response(),
        Err(r) => r,
    }
}
