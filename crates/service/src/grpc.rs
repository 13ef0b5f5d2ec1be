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
