//! The client side of the cluster's TLS: a tonic connector that opens a TCP connection to the
//! endpoint's host and port and completes a rustls handshake with the configuration current at
//! that moment (so a reconnect after a rotation presents the new certificate).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;
use tonic::codegen::http::Uri;

use super::Tls;

/// Connects to peers over TLS (see the module docs).
#[derive(Clone)]
pub(super) struct Connector {
    tls: Tls,
}

impl Connector {
    pub(super) fn new(tls: Tls) -> Self {
        Self { tls }
    }
}

fn invalid(what: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, what)
}

impl tower::Service<Uri> for Connector {
    type Response = TokioIo<TlsStream<TcpStream>>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let tls = self.tls.clone();
        Box::pin(async move {
            let host = uri
                .host()
                .ok_or_else(|| invalid(format!("{uri}: no host")))?
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string();
            let port = uri
                .port_u16()
                .ok_or_else(|| invalid(format!("{uri}: no port")))?;
            let tcp = TcpStream::connect((host.as_str(), port)).await?;
            tcp.set_nodelay(true)?;
            let name = tls.server_name().unwrap_or(&host).to_string();
            let name = ServerName::try_from(name.clone())
                .map_err(|e| invalid(format!("TLS server name {name:?}: {e}")))?;
            let stream = TlsConnector::from(tls.client_config())
                .connect(name, tcp)
                .await?;
            Ok(TokioIo::new(stream))
        })
    }
}
