//! Errors of the HTTP API as OpenAI error objects, with the HTTP status each gRPC code maps to
//! (one place): 400 bad input, 401 no valid key, 404 unknown model, 429 full, 503 no worker or
//! draining, 504 deadline, 500 otherwise.

use std::borrow::Cow;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use rrt_service::validate;
use tonic::Code;

use super::types::{ErrorBody, ErrorDetail};

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub param: Option<Cow<'static, str>>,
    pub code: Option<String>,
}

impl ApiError {
    pub fn bad_request(message: impl Into<String>, param: Option<&'static str>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            param: param.map(Cow::Borrowed),
            code: None,
        }
    }

    /// A 400 naming a field of the request that is known only at run time.
    pub fn bad_field(message: impl Into<String>, param: String) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            param: Some(Cow::Owned(param)),
            code: None,
        }
    }

    pub fn unauthorized(message: &str) -> Self {
        Self {
            status: StatusCode::UNAUTHORIZED,
            message: message.to_string(),
            param: None,
            code: Some("invalid_api_key".into()),
        }
    }

    fn kind(&self) -> &'static str {
        match self.status {
            StatusCode::BAD_REQUEST | StatusCode::NOT_FOUND => "invalid_request_error",
            StatusCode::UNAUTHORIZED => "authentication_error",
            StatusCode::TOO_MANY_REQUESTS => "rate_limit_error",
            StatusCode::SERVICE_UNAVAILABLE | StatusCode::GATEWAY_TIMEOUT => "service_unavailable",
            _ => "server_error",
        }
    }

    /// The JSON body (also sent as an SSE event when a stream fails).
    pub fn body(&self) -> ErrorBody {
        ErrorBody {
            error: ErrorDetail {
                message: self.message.clone(),
                kind: self.kind(),
                param: self.param.clone(),
                code: self.code.clone(),
            },
        }
    }
}

impl From<tonic::Status> for ApiError {
    fn from(s: tonic::Status) -> Self {
        let message = s.message().to_string();
        let (status, code) = match s.code() {
            Code::InvalidArgument if validate::reason_of(&s) == "unknown_model" => {
                (StatusCode::NOT_FOUND, Some("model_not_found"))
            }
            Code::InvalidArgument | Code::OutOfRange | Code::FailedPrecondition => {
                (StatusCode::BAD_REQUEST, None)
            }
            Code::Unauthenticated => (StatusCode::UNAUTHORIZED, Some("invalid_api_key")),
            Code::ResourceExhausted => (StatusCode::TOO_MANY_REQUESTS, Some("overloaded")),
            Code::Unavailable => (StatusCode::SERVICE_UNAVAILABLE, Some("unavailable")),
            Code::DeadlineExceeded => (StatusCode::GATEWAY_TIMEOUT, Some("deadline_exceeded")),
            Code::Cancelled => (StatusCode::BAD_REQUEST, Some("cancelled")),
            _ => (StatusCode::INTERNAL_SERVER_ERROR, None),
        };
        // A constraint the worker's compiler refused came from `response_format` (or tools).
        let param = (validate::reason_of(&s) == "bad_constraint")
            .then_some(Cow::Borrowed("response_format"));
        Self {
            status,
            message,
            param,
            code: code.map(String::from),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body())).into_response()
    }
}
