//! PEM files to rustls configurations: the three server sides (internal gRPC ports that want a
//! client certificate from the CA, the router's public gRPC port, HTTP ports) and the client side,
//! with errors that name the flag and the file.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

use super::TlsArgs;

/// The files and their contents, as read (compared to detect a rotation).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Files {
    cert_path: PathBuf,
    key_path: PathBuf,
    ca_path: Option<PathBuf>,
    cert: Vec<u8>,
    key: Vec<u8>,
    ca: Option<Vec<u8>>,
}

/// What handshakes use.
pub(super) struct Configs {
    pub internal: Arc<ServerConfig>,
    pub public: Arc<ServerConfig>,
    pub http: Arc<ServerConfig>,
    pub client: Arc<ClientConfig>,
}

fn read(path: &Path, flag: &str) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("{flag} {}", path.display()))
}

impl Files {
    pub(super) fn read(args: &TlsArgs) -> anyhow::Result<Files> {
        let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) else {
            anyhow::bail!("--tls-cert and --tls-key go together");
        };
        Ok(Files {
            cert: read(cert, "--tls-cert")?,
            key: read(key, "--tls-key")?,
            ca: args
                .tls_ca
                .as_ref()
                .map(|p| read(p, "--tls-ca"))
                .transpose()?,
            cert_path: cert.clone(),
            key_path: key.clone(),
            ca_path: args.tls_ca.clone(),
        })
    }
}

fn certificates(
    pem: &[u8],
    flag: &str,
    path: &Path,
) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow::anyhow!("{flag} {}: not PEM certificates: {e}", path.display()))?;
    anyhow::ensure!(
        !certs.is_empty(),
        "{flag} {}: not PEM (no -----BEGIN CERTIFICATE----- block)",
        path.display()
    );
    Ok(certs)
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Builds every configuration from `files`.
pub(super) fn build(files: &Files) -> anyhow::Result<Configs> {
    let (cert_path, key_path) = (&files.cert_path, &files.key_path);
    let chain = certificates(&files.cert, "--tls-cert", cert_path)?;
    let key = PrivateKeyDer::from_pem_slice(&files.key).map_err(|e| {
        anyhow::anyhow!(
            "--tls-key {}: not a PEM private key: {e}",
            key_path.display()
        )
    })?;
    let mut roots = RootCertStore::empty();
    if let (Some(pem), Some(path)) = (&files.ca, &files.ca_path) {
        for cert in certificates(pem, "--tls-ca", path)? {
            roots
                .add(cert)
                .with_context(|| format!("--tls-ca {}", path.display()))?;
        }
    }
    let roots = Arc::new(roots);
    let pair = || {
        format!(
            "--tls-cert {} / --tls-key {}",
            cert_path.display(),
            key_path.display()
        )
    };

    let server = |client_ca: bool, alpn: &[&[u8]]| -> anyhow::Result<Arc<ServerConfig>> {
        let builder = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?;
        let builder = if client_ca {
            let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
                .build()
                .context("--tls-ca: client verification")?;
            builder.with_client_cert_verifier(verifier)
        } else {
            builder.with_no_client_auth()
        };
        let mut config = builder
            .with_single_cert(chain.clone(), key.clone_key())
            .with_context(pair)?;
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Ok(Arc::new(config))
    };
    let grpc: &[&[u8]] = &[b"h2"];
    let mut client = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots.clone())
        .with_client_auth_cert(chain.clone(), key.clone_key())
        .with_context(pair)?;
    client.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Configs {
        internal: server(files.ca.is_some(), grpc)?,
        public: server(false, grpc)?,
        http: server(false, &[b"h2", b"http/1.1"])?,
        client: Arc::new(client),
    })
}
