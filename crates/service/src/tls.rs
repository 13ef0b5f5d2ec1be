//! TLS for the cluster's gRPC ports and connections, from PEM files (a Kubernetes Secret
//! mounted in every pod): each service presents `--tls-cert`/`--tls-key` on its gRPC port and,
//! as a client of the other services, verifies their certificates against `--tls-ca` and
//! presents its own (mutual TLS). Internal ports (workers, coordinator) then refuse clients
//! without a certificate signed by that CA; the router's public port asks for none (its callers
//! authenticate with bearer tokens). Certificates are read at start: rotating them means
//! restarting the pods (tonic's TLS acceptor is built once per server).

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity, ServerTlsConfig};

/// The TLS flags every service takes (env `RRT_TLS_*`).
#[derive(Args, Debug, Clone, Default)]
pub struct TlsArgs {
    /// PEM certificate chain this service presents on its gRPC port and to its peers.
    #[arg(long, env = "RRT_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of `--tls-cert`.
    #[arg(long, env = "RRT_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// PEM CA of the cluster: peers' certificates are verified against it, and clients of an
    /// internal port must present a certificate it signed.
    #[arg(long, env = "RRT_TLS_CA", requires = "tls_cert")]
    pub tls_ca: Option<PathBuf>,
    /// The name peers' certificates must carry, instead of the host of their URL (workers
    /// addressed by pod IP: give their certificates a DNS name and name it here).
    #[arg(long, env = "RRT_TLS_SERVER_NAME")]
    pub tls_server_name: Option<String>,
}

/// Loaded TLS material; `None` from [`TlsArgs::load`] means plaintext.
#[derive(Debug, Clone)]
pub struct Tls {
    identity: Identity,
    ca: Option<Certificate>,
    server_name: Option<String>,
}

fn read(path: &Path, what: &str) -> anyhow::Result<Vec<u8>> {
    let bytes = std::fs::read(path).with_context(|| format!("{what} {}", path.display()))?;
    anyhow::ensure!(
        bytes.windows(10).any(|w| w == b"-----BEGIN"),
        "{what} {}: not PEM (no -----BEGIN line)",
        path.display()
    );
    Ok(bytes)
}

impl TlsArgs {
    /// Reads the files (errors name the flag and the file); `None` without `--tls-cert`.
    pub fn load(&self) -> anyhow::Result<Option<Tls>> {
        let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) else {
            return Ok(None);
        };
        let identity = Identity::from_pem(read(cert, "--tls-cert")?, read(key, "--tls-key")?);
        let ca = match &self.tls_ca {
            Some(ca) => Some(Certificate::from_pem(read(ca, "--tls-ca")?)),
            None => None,
        };
        Ok(Some(Tls {
            identity,
            ca,
            server_name: self.tls_server_name.clone(),
        }))
    }
}

impl Tls {
    /// The server side of a gRPC port. `internal`: clients must present a certificate signed by
    /// the CA (when one is given).
    pub fn server(&self, internal: bool) -> ServerTlsConfig {
        let config = ServerTlsConfig::new().identity(self.identity.clone());
        match (&self.ca, internal) {
            (Some(ca), true) => config.client_ca_root(ca.clone()),
            _ => config,
        }
    }

    /// The client side: verify the peer against the CA, present this service's certificate.
    pub fn client(&self) -> ClientTlsConfig {
        let mut config = ClientTlsConfig::new().identity(self.identity.clone());
        if let Some(ca) = &self.ca {
            config = config.ca_certificate(ca.clone());
        }
        if let Some(name) = &self.server_name {
            config = config.domain_name(name.clone());
        }
        config
    }
}

/// The URL of a peer at `address` (`host:port`), in the scheme `tls` calls for.
pub fn url(address: &str, tls: Option<&Tls>) -> String {
    let scheme = if tls.is_some() { "https" } else { "http" };
    format!("{scheme}://{address}")
}

/// An endpoint for `url` (any scheme: with TLS it is made `https`), TLS applied when given.
pub fn endpoint(url: &str, tls: Option<&Tls>) -> anyhow::Result<Endpoint> {
    let url = match (tls, url.strip_prefix("http://")) {
        (Some(_), Some(rest)) => format!("https://{rest}"),
        _ => url.to_string(),
    };
    let endpoint = Endpoint::from_shared(url.clone()).with_context(|| format!("URL {url:?}"))?;
    Ok(match tls {
        Some(t) => endpoint
            .tls_config(t.client())
            .with_context(|| format!("TLS for {url}"))?,
        None => endpoint,
    })
}
