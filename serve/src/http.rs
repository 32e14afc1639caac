//! The HTTP JSON API:
//!
//! - `POST /v1/decide`: a request by its parts (the engine's `RequestSpec`,
//!   what `tenantgate check` takes), answered 200 with `check`'s JSON
//!   whatever the decision; 400 for a body that is no such request or a
//!   request the bundle's settings cannot express; 413 above
//!   [`MAX_BODY_BYTES`](crate::MAX_BODY_BYTES);
//! - `GET /v1/bundle`: `{"version", "tenants", "policies"}`;
//! - `GET /healthz`: `{"status": "ok", "version"}`, plus `"last_reload":
//!   {"status": "failed", "at_s", "error"}` while the last SIGHUP reload
//!   failed (the previous bundle serving; still 200);
//! - `GET /metrics`: Prometheus text (`tenantgate_serve_*`, and with the
//!   control plane its series);
//! - the control plane's `/v1/rollout` and `/v1/rollback` (`control`).
//!
//! Every error body is `{"error": ..., "message": ...}`.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State as Extract};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use tenantgate_engine::http::RequestSpec;

use crate::{now_ns, State, MAX_BODY_BYTES};

/// The API's routes over the shared state.
pub fn router(state: Arc<State>) -> Router {
    Router::new()
        .route(
            "/v1/decide",
            post(decide).fallback(|| method_not_allowed("POST")),
        )
        .route(
            "/v1/bundle",
            get(bundle).fallback(|| method_not_allowed("GET,HEAD")),
        )
        .route(
            "/healthz",
            get(healthz).fallback(|| method_not_allowed("GET,HEAD")),
        )
        .route(
            "/metrics",
            get(metrics).fallback(|| method_not_allowed("GET,HEAD")),
        )
        // The control plane (`--xds`): src/control.rs.
        .route(
            "/v1/rollout",
            get(crate::control::status).post(crate::control::rollout),
        )
        .route("/v1/rollback", post(crate::control::rollback))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}

pub(crate) fn json(status: StatusCode, value: &serde_json::Value) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        value.to_string(),
    )
        .into_response()
}

pub(crate) fn error(status: StatusCode, error: &str, message: impl Into<String>) -> Response {
    json(
        status,
        &serde_json::json!({ "error": error, "message": message.into() }),
    )
}

async fn decide(
    Extract(state): Extract<Arc<State>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let body = match body {
        Ok(b) => b,
        Err(r) if r.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                format!("the body is larger than {MAX_BODY_BYTES} bytes"),
            )
        }
        Err(r) => return error(r.status(), "bad_request", r.body_text()),
    };
    // Only an object can be a request (and serde's message for anything
    // else would name a Rust type).
    if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return error(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "the body is not a JSON object",
        );
    }
    let spec: RequestSpec = match serde_json::from_slice(&body) {
        Ok(s) => s,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                "bad_request",
                format!("the body is not a request: {e}"),
            )
        }
    };
    let worker = state.worker();
    let effects = match worker.check(&spec, now_ns(), None) {
        Ok(x) => x,
        Err(m) => return error(StatusCode::BAD_REQUEST, "bad_request", m),
    };
    state.count_decision(crate::Api::Http, effects.decision.is_allowed());
    state.audit(&effects.logs);
    match worker.engine().outcome_json(&effects) {
        Ok(v) => json(StatusCode::OK, &v),
        Err(m) => error(StatusCode::INTERNAL_SERVER_ERROR, "internal", m),
    }
}

async fn bundle(Extract(state): Extract<Arc<State>>) -> Response {
    let engine = state.engine();
    let tenants: Vec<String> = engine.tenants().iter().map(|t| t.to_string()).collect();
    json(
        StatusCode::OK,
        &serde_json::json!({
            "version": engine.version(),
            "tenants": tenants,
            "policies": engine.policy_count(),
        }),
    )
}

async fn healthz(Extract(state): Extract<Arc<State>>) -> Response {
    let mut body = serde_json::json!({ "status": "ok", "version": state.engine().version() });
    if let (Some(f), Some(obj)) = (state.failed_reload(), body.as_object_mut()) {
        obj.insert(
            "last_reload".into(),
            serde_json::json!({ "status": "failed", "at_s": f.at_s, "error": f.error }),
        );
    }
    json(StatusCode::OK, &body)
}

async fn metrics(Extract(state): Extract<Arc<State>>) -> Response {
    let mut text = state.metrics_text();
    if let Some(p) = state.plane() {
        text.push_str(&p.fleet().metrics());
    }
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        text,
    )
        .into_response()
}

/// 405 with the JSON error body and the `allow` header.
async fn method_not_allowed(allow: &'static str) -> Response {
    let mut r = error(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!("this endpoint takes `{allow}`"),
    );
    r.headers_mut()
        .insert(header::ALLOW, header::HeaderValue::from_static(allow));
    r
}

async fn not_found() -> Response {
    error(StatusCode::NOT_FOUND, "not_found", "no such endpoint")
}
