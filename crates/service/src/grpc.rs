//! What every gRPC server of the cluster carries besides its own services: `grpc.health.v1`
//! (NOT_SERVING while starting or draining, so Kubernetes probes and routers stop sending work)
//! and server reflection in both v1 and v1alpha (grpcurl 1.8 speaks only v1alpha), listing the
//! rrt services and health.

pub use tonic_health::server::HealthReporter;

/// Health service plus its reporter; every named service starts NOT_SERVING.
pub struct Health {
    pub reporter: HealthReporter,
    pub service: tonic_health::pb::health_server::HealthServer<tonic_health::server::HealthService>,
}

/// Creates the health service, with `services` (fully-qualified names) and the overall ("")
/// status set to NOT_SERVING until [`set_serving`] is called.
pub async fn health(services: &[&str]) -> Health {
    let reporter = HealthReporter::new();
    let service = tonic_health::pb::health_server::HealthServer::new(
        tonic_health::server::HealthService::from_health_reporter(reporter.clone()),
    );
    for s in services.iter().copied().chain([""]) {
        reporter
            .set_service_status(s, tonic_health::ServingStatus::NotServing)
            .await;
    }
    Health { reporter, service }
}

/// Sets `services` and the overall status to `serving` (true: SERVING, false: NOT_SERVING).
pub async fn set_serving(reporter: &HealthReporter, services: &[&str], serving: bool) {
    let status = if serving {
        tonic_health::ServingStatus::Serving
    } else {
        tonic_health::ServingStatus::NotServing
    };
    for s in services.iter().copied().chain([""]) {
        reporter.set_service_status(s, status).await;
    }
    let mut ready = READY.lock().unwrap_or_else(|p| p.into_inner());
    for s in services {
        ready.insert(s.to_string(), serving);
    }
}

/// The serving status of every service of this process, as [`set_serving`] last set it: what
/// the metrics port's `/ready` answers (kubelet's gRPC probes cannot speak TLS).
static READY: std::sync::Mutex<std::collections::BTreeMap<String, bool>> =
    std::sync::Mutex::new(std::collections::BTreeMap::new());

/// `Ok` when every service of the process is SERVING; `Err` names those that are not.
pub fn readiness() -> Result<(), String> {
    let ready = READY.lock().unwrap_or_else(|p| p.into_inner());
    let down: Vec<&str> = ready
        .iter()
        .filter(|(_, &up)| !up)
        .map(|(s, _)| s.as_str())
        .collect();
    match (ready.is_empty(), down.is_empty()) {
        (true, _) => Err("starting".into()),
        (false, true) => Ok(()),
        (false, false) => Err(format!("NOT_SERVING: {}", down.join(", "))),
    }
}

/// Reflection services (v1, v1alpha) describing rrt.v1 and grpc.health.v1.
pub fn reflection() -> anyhow::Result<(
    tonic_reflection::server::v1::ServerReflectionServer<
        impl tonic_reflection::server::v1::ServerReflection,
    >,
    tonic_reflection::server::v1alpha::ServerReflectionServer<
        impl tonic_reflection::server::v1alpha::ServerReflection,
    >,
)> {
    let v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(rrt_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(rrt_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;
    Ok((v1, v1alpha))
}

/// A response's gRPC status rewritten where tonic answers a request message over the server's
/// decoding limit with OUT_OF_RANGE: gRPC's convention for a message over a limit is
/// RESOURCE_EXHAUSTED (what clients retry on, or report, as "too large").
pub fn over_limit_is_resource_exhausted<B>(
    mut response: tonic::codegen::http::Response<B>,
) -> tonic::codegen::http::Response<B> {
    let headers = response.headers();
    let over_limit = headers.get("grpc-status").is_some_and(|s| s == "11")
        && headers
            .get("grpc-message")
            .and_then(|m| m.to_str().ok())
            .is_some_and(|m| m.replace("%20", " ").contains("message length too large"));
    if over_limit {
        response.headers_mut().insert(
            "grpc-status",
            tonic::codegen::http::HeaderValue::from_static("8"),
        );
    }
    response
}

/// The layer every server of the cluster carries: [`over_limit_is_resource_exhausted`].
pub fn over_limit_layer<B>() -> tower::util::MapResponseLayer<
    fn(tonic::codegen::http::Response<B>) -> tonic::codegen::http::Response<B>,
> {
    tower::util::MapResponseLayer::new(over_limit_is_resource_exhausted::<B>)
}

#[cfg(test)]
mod tests {
    use tonic::codegen::http::Response;

    use super::*;

    fn response(status: &'static str, message: &'static str) -> Response<()> {
        let mut r = Response::new(());
        r.headers_mut()
            .insert("grpc-status", status.parse().unwrap());
        r.headers_mut()
            .insert("grpc-message", message.parse().unwrap());
        r
    }

    #[test]
    fn only_an_over_limit_message_becomes_resource_exhausted() {
        let over = "Error,%20decoded%20message%20length%20too%20large:%20found%202097158%20bytes";
        let r = over_limit_is_resource_exhausted(response("11", over));
        assert_eq!(r.headers()["grpc-status"], "8");
        // Other OUT_OF_RANGE answers, and other codes, pass as they are.
        let r = over_limit_is_resource_exhausted(response("11", "position%20past%20the%20end"));
        assert_eq!(r.headers()["grpc-status"], "11");
        let r = over_limit_is_resource_exhausted(response("3", over));
        assert_eq!(r.headers()["grpc-status"], "3");
    }
}
