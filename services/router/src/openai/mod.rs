//! The OpenAI-compatible HTTP API on its own port (`--http-listen`): `POST /v1/completions`,
//! `POST /v1/chat/completions` (JSON or server-sent events), `GET /v1/models`, `GET /health`.
//! It runs on the router's tokio runtime behind the same validation, admission, deadlines,
//! balancing, failover and metrics as the gRPC API ([`complete`]), with the same bearer tokens
//! (`authorization: Bearer <key>`), TLS when the router has it, and a 1 MiB body limit. Errors
//! are OpenAI error objects ([`error`]); the wire types are in [`types`]; `response_format` and
//! the refusal of fields rrt does not honour are in [`structured`]; tool calling in [`tools`].

mod complete;
mod error;
mod structured;
mod tools;
mod types;

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use rrt_service::tls::{self, Side, Tls};
use rrt_service::Shutdown;
use serde_json::json;
use tokio::net::TcpListener;

use crate::auth::ApiTokens;
use crate::service::{Inner, MAX_REQUEST_BYTES};
use error::ApiError;

#[derive(Clone)]
struct Api {
    inner: Arc<Inner>,
    tokens: Option<ApiTokens>,
}

impl Api {
    fn authorize(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        match &self.tokens {
            None => Ok(()),
            Some(t) => t
                .check_header(headers.get("authorization").map(|h| h.as_bytes()))
                .map_err(ApiError::unauthorized),
        }
    }
}

/// The caller's timeout: `x-request-timeout` seconds (OpenAI clients send their own `timeout`
/// as a socket timeout only), else the router's default.
fn timeout(headers: &HeaderMap) -> Option<Duration> {
    headers
        .get("x-request-timeout")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s > 0.0)
        .map(Duration::from_secs_f64)
}

async fn completions(State(api): State<Api>, headers: HeaderMap, body: Bytes) -> Response {
    let result = match api.authorize(&headers) {
        Ok(()) => complete::completions(api.inner.clone(), timeout(&headers), &body).await,
        Err(e) => Err(e),
    };
    result.unwrap_or_else(IntoResponse::into_response)
}

async fn chat(State(api): State<Api>, headers: HeaderMap, body: Bytes) -> Response {
    let result = match api.authorize(&headers) {
        Ok(()) => complete::chat(api.inner.clone(), timeout(&headers), &body).await,
        Err(e) => Err(e),
    };
    result.unwrap_or_else(IntoResponse::into_response)
}

async fn models(State(api): State<Api>, headers: HeaderMap) -> Response {
    if let Err(e) = api.authorize(&headers) {
        return e.into_response();
    }
    let data: Vec<_> = api
        .inner
        .pool
        .models()
        .iter()
        .map(|m| json!({"id": m, "object": "model", "created": 0, "owned_by": "rrt"}))
        .collect();
    Json(json!({"object": "list", "data": data})).into_response()
}

/// 200 while the router is serving and knows a worker, else 503.
async fn health(State(api): State<Api>) -> Response {
    if api.inner.admission.is_draining() {
        return (StatusCode::SERVICE_UNAVAILABLE, "draining").into_response();
    }
    if api.inner.pool.models().is_empty() {
        return (StatusCode::SERVICE_UNAVAILABLE, "no worker").into_response();
    }
    (StatusCode::OK, "ok").into_response()
}

/// Any other path: an OpenAI-style 404.
async fn unknown_route(req: Request) -> Response {
    ApiError {
        status: StatusCode::NOT_FOUND,
        message: format!("Unknown request URL: {} {}", req.method(), req.uri().path()),
        param: None,
        code: Some("unknown_url".into()),
    }
    .into_response()
}

/// Counts every HTTP request by route and status code (`rrt_router_http_requests_total`), the
/// ones refused before they reach the generation path (bad JSON, a missing key, an unknown
/// route) included; a stream counts when its headers are sent.
async fn count(path: Option<MatchedPath>, req: Request, next: Next) -> Response {
    let endpoint = path.map_or_else(|| "unmatched".to_string(), |p| p.as_str().to_string());
    let res = next.run(req).await;
    metrics::counter!(
        "rrt_router_http_requests_total",
        "endpoint" => endpoint,
        "status" => res.status().as_u16().to_string()
    )
    .increment(1);
    res
}

/// Serves the API on `listener` until `shutdown` (in-flight requests finish first).
pub async fn serve(
    listener: TcpListener,
    tls: Option<&Tls>,
    inner: Arc<Inner>,
    tokens: Option<ApiTokens>,
    shutdown: Shutdown,
) -> std::io::Result<()> {
    let incoming = tls::incoming(listener, tls, Side::Http)?;
    let app = Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat))
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .fallback(unknown_route)
        .layer(DefaultBodyLimit::max(MAX_REQUEST_BYTES))
        .layer(middleware::from_fn(count))
        .with_state(Api { inner, tokens });
    axum::serve(incoming, app)
        .with_graceful_shutdown(async move { shutdown.wait().await })
        .await
}
