//! TLS and authentication: a cluster whose coordinator, worker and router talk mutual TLS
//! (certificates made here with rcgen), a router that wants a bearer token. Strangers are
//! refused: a client without a certificate or with one from another CA at an internal port, a
//! caller without the token at the public port, plaintext at a TLS port (cleanly, no hang).
//! Metrics ports serve HTTPS (checked with curl), and rotated certificate files apply without a
//! restart while a broken set is refused and the previous one kept.

#![forbid(unsafe_code)]

use std::path::Path;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
};
use rrt_proto::v1 as pb;
use rrt_proto::v1::generation_client::GenerationClient;
use rrt_proto::v1::worker_client::WorkerClient;
use rrt_tests::cluster::{self, greedy};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::Code;

const TOKEN: &str = "test-token-0123456789abcdef";

/// A CA, and a certificate it signed for `localhost` / 127.0.0.1 (server and client use):
/// `(ca.pem, cert.pem, key.pem)`.
fn pki() -> (String, String, String) {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    // Distinct names: OpenSSL (curl) takes a leaf named like its issuer for self-signed.
    ca.distinguished_name
        .push(DnType::CommonName, "rrt test CA");
    let ca_pem = ca.self_signed(&ca_key).unwrap().pem();
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate().unwrap();
    let mut leaf = CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
    leaf.distinguished_name
        .push(DnType::CommonName, "localhost");
    leaf.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let cert = leaf.signed_by(&key, &issuer).unwrap().pem();
    (ca_pem, cert, key.serialize_pem())
}

/// Writes `pem` to `dir/name` atomically (as a Secret volume update does); returns the path.
fn write(dir: &Path, name: &str, pem: &str) -> String {
    let path = dir.join(name);
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, pem).unwrap();
    std::fs::rename(&tmp, &path).unwrap();
    path.display().to_string()
}

/// `curl` over HTTPS trusting `ca`: the body, or curl's error.
fn curl(url: &str, ca: &str) -> Result<String, String> {
    let out = std::process::Command::new("curl")
        .args(["-sS", "--max-time", "10", "--cacert", ca, url])
        .output()
        .expect("curl runs");
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

async fn channel(url: String, tls: Option<ClientTlsConfig>) -> Result<Channel, String> {
    let mut e = Endpoint::from_shared(url).unwrap();
    if let Some(t) = tls {
        e = e.tls_config(t).unwrap();
    }
    let connect = tokio::time::timeout(Duration::from_secs(10), e.connect());
    match connect.await {
        Ok(Ok(c)) => Ok(c),
        Ok(Err(e)) => Err(format!("{e:?}")),
        Err(_) => panic!("connecting hung"),
    }
}

/// A generation through the router with `token` (if any): the number of tokens, or the code.
async fn generate(channel: Channel, token: Option<&str>) -> Result<usize, Code> {
    let header: Option<tonic::metadata::MetadataValue<_>> =
        token.map(|t| format!("Bearer {t}").parse().unwrap());
    let mut client =
        GenerationClient::with_interceptor(channel, move |mut req: tonic::Request<()>| {
            if let Some(h) = &header {
                req.metadata_mut().insert("authorization", h.clone());
            }
            Ok(req)
        });
    let mut s = client
        .generate_stream(greedy("Hello", 4))
        .await
        .map_err(|s| s.code())?
        .into_inner();
    let mut n = 0;
    while let Some(m) = s.message().await.map_err(|s| s.code())? {
        n += m.token().is_some() as usize;
    }
    Ok(n)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mutual_tls_cluster_serves_token_holders_and_refuses_strangers() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = pki();
    let (_, stranger_cert, stranger_key) = pki();
    let ca_path = write(dir.path(), "ca.pem", &ca);
    let cert_path = write(dir.path(), "cert.pem", &cert);
    let key_path = write(dir.path(), "key.pem", &key);
    let tls = [
        "--tls-cert",
        cert_path.as_str(),
        "--tls-key",
        key_path.as_str(),
        "--tls-ca",
        ca_path.as_str(),
    ];
    let mut coordinator_flags = tls.to_vec();
    coordinator_flags.push("--metrics-plaintext");
    let c = cluster::coordinator(&coordinator_flags).await;
    let w = cluster::worker(Some(c.running.grpc_addr), &tls).await;
    let mut router_flags = tls.to_vec();
    router_flags.extend(["--api-token", TOKEN]);
    let r = cluster::router(Some(c.running.grpc_addr), &router_flags).await;
    // The worker registered with the coordinator and the router follows it: both over mTLS.
    cluster::wait_for_workers(&r.running, 1).await;

    let trust = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&ca));
    let public = format!("https://{}", r.running.grpc_addr);
    let to_router = channel(public.clone(), Some(trust.clone())).await.unwrap();
    assert_eq!(generate(to_router.clone(), Some(TOKEN)).await, Ok(4));
    assert_eq!(
        generate(to_router.clone(), None).await,
        Err(Code::Unauthenticated)
    );
    assert_eq!(
        generate(to_router, Some("test-token-0123456789abcdeX")).await,
        Err(Code::Unauthenticated)
    );

    // The worker's port: only clients with a certificate from the cluster's CA.
    let internal = format!("https://{}", w.running.grpc_addr);
    let info = |tls: ClientTlsConfig| {
        let url = internal.clone();
        async move {
            let ch = channel(url, Some(tls)).await?;
            WorkerClient::new(ch)
                .info(pb::WorkerInfoRequest {})
                .await
                .map(|_| ())
                .map_err(|s| format!("{s:?}"))
        }
    };
    info(trust.clone())
        .await
        .expect_err("no client certificate: refused");
    let stranger = trust
        .clone()
        .identity(Identity::from_pem(&stranger_cert, &stranger_key));
    info(stranger)
        .await
        .expect_err("a certificate from another CA: refused");
    let member = trust.identity(Identity::from_pem(&cert, &key));
    info(member).await.expect("a cluster certificate: served");

    // --metrics-plaintext: the coordinator's metrics port answers plain HTTP.
    let ready = cluster::http_get(c.running.metrics_addr, "/ready").await;
    assert!(ready.contains("SERVING"), "{ready}");

    // Plaintext to a TLS port fails, and promptly.
    let plain = format!("http://{}", r.running.grpc_addr);
    let outcome = match channel(plain, None).await {
        Err(e) => Err(e),
        Ok(ch) => tokio::time::timeout(Duration::from_secs(10), generate(ch, Some(TOKEN)))
            .await
            .expect("plaintext to a TLS port must not hang")
            .map_err(|c| format!("{c:?}")),
    };
    assert!(outcome.is_err(), "plaintext was served: {outcome:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tls_files_are_refused_naming_the_flag_and_file() {
    let dir = tempfile::tempdir().unwrap();
    let not_pem = write(dir.path(), "cert.pem", "hello");
    let missing = dir.path().join("missing.pem").display().to_string();
    for (cert, key, what) in [
        (not_pem.as_str(), not_pem.as_str(), "not PEM"),
        (missing.as_str(), not_pem.as_str(), "missing.pem"),
    ] {
        let args = rrt_service::tls::TlsArgs {
            tls_cert: Some(cert.into()),
            tls_key: Some(key.into()),
            ..Default::default()
        };
        let err = format!("{:#}", args.load().unwrap_err());
        assert!(err.contains("--tls-cert") && err.contains(what), "{err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_https_and_rotated_certificates_apply_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (ca_a, cert_a, key_a) = pki();
    let (ca_b, cert_b, key_b) = pki();
    let ca = write(dir.path(), "ca.pem", &ca_a);
    let cert = write(dir.path(), "cert.pem", &cert_a);
    let key = write(dir.path(), "key.pem", &key_a);
    let w = cluster::worker(
        None,
        &[
            "--tls-cert",
            &cert,
            "--tls-key",
            &key,
            "--tls-ca",
            &ca,
            "--tls-reload-ms",
            "100",
        ],
    )
    .await;
    let internal = format!("https://{}", w.running.grpc_addr);
    let info = |ca: &str, cert: &str, key: &str| {
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(ca))
            .identity(Identity::from_pem(cert, key));
        let url = internal.clone();
        async move {
            let ch = channel(url, Some(tls)).await?;
            WorkerClient::new(ch)
                .info(pb::WorkerInfoRequest {})
                .await
                .map(|_| ())
                .map_err(|s| format!("{s:?}"))
        }
    };
    info(&ca_a, &cert_a, &key_a).await.expect("set A served");

    // The metrics port: HTTPS (server certificate only, as probes and Prometheus verify).
    let metrics = |path: &str| format!("https://{}{path}", w.running.metrics_addr);
    let ca_a_path = write(dir.path(), "trust-a.pem", &ca_a);
    let ca_b_path = write(dir.path(), "trust-b.pem", &ca_b);
    assert_eq!(
        curl(&metrics("/ready"), &ca_a_path).as_deref(),
        Ok("SERVING")
    );
    let plain = std::process::Command::new("curl")
        .args(["-sS", "--max-time", "10"])
        .arg(format!("http://{}/ready", w.running.metrics_addr))
        .output()
        .unwrap();
    assert!(
        !plain.status.success(),
        "plaintext served on a TLS metrics port"
    );

    // Rotate to set B: new handshakes present B and want B's clients.
    write(dir.path(), "cert.pem", &cert_b);
    write(dir.path(), "key.pem", &key_b);
    write(dir.path(), "ca.pem", &ca_b);
    let start = std::time::Instant::now();
    while info(&ca_b, &cert_b, &key_b).await.is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "set B never applied"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    info(&ca_a, &cert_a, &key_a)
        .await
        .expect_err("set A is no longer trusted");
    assert!(curl(&metrics("/ready"), &ca_a_path).is_err());
    assert_eq!(
        curl(&metrics("/ready"), &ca_b_path).as_deref(),
        Ok("SERVING")
    );

    // A broken file is refused, counted, and set B stays in use.
    write(dir.path(), "cert.pem", "not a certificate");
    let start = std::time::Instant::now();
    loop {
        let scrape = curl(&metrics("/metrics"), &ca_b_path).unwrap();
        if cluster::metric(&scrape, "rrt_tls_reloads_total", &["outcome=\"refused\""]) >= 1.0 {
            assert!(
                cluster::metric(&scrape, "rrt_tls_reloads_total", &["outcome=\"applied\""]) >= 1.0
            );
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the broken set was not seen"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    info(&ca_b, &cert_b, &key_b)
        .await
        .expect("set B still served after a broken rotation");
}
