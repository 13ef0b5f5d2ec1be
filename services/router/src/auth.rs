//! Bearer-token authentication of the public API: with tokens configured (`--api-token-file`,
//! one per line, or `RRT_ROUTER_API_TOKENS`, comma-separated), every Generation call must carry
//! `authorization: Bearer <token>` naming one of them, or it is refused UNAUTHENTICATED before
//! anything else runs. Tokens are compared in constant time (`subtle`), each one in full.
//! Health and reflection stay open (probes carry no token).

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use subtle::ConstantTimeEq;
use tonic::{Request, Status};

/// The accepted tokens.
#[derive(Clone)]
pub struct ApiTokens(Arc<Vec<Vec<u8>>>);

impl ApiTokens {
    /// The tokens of `file` (one per line; blank lines and `#` comments skipped) and `inline`;
    /// `None` when there are none (authentication off).
    pub fn load(file: Option<&Path>, inline: &[String]) -> anyhow::Result<Option<Self>> {
        let mut tokens: Vec<Vec<u8>> = inline
            .iter()
            .map(|t| t.trim())
            .filter(|t| !t.is_empty())
            .map(|t| t.as_bytes().to_vec())
            .collect();
        if let Some(path) = file {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("--api-token-file {}", path.display()))?;
            tokens.extend(
                text.lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty() && !l.starts_with('#'))
                    .map(|l| l.as_bytes().to_vec()),
            );
            anyhow::ensure!(
                !tokens.is_empty(),
                "--api-token-file {}: no tokens in it",
                path.display()
            );
        }
        if let Some(short) = tokens.iter().find(|t| t.len() < 16) {
            anyhow::bail!(
                "API tokens must be at least 16 bytes (one has {}): a short token is guessable",
                short.len()
            );
        }
        Ok((!tokens.is_empty()).then(|| Self(Arc::new(tokens))))
    }

    /// Whether `presented` is one of the tokens; every token is compared in full.
    fn accepts(&self, presented: &[u8]) -> bool {
        let mut ok = subtle::Choice::from(0);
        for t in self.0.iter() {
            ok |= t.as_slice().ct_eq(presented);
        }
        ok.into()
    }

    /// The check of an `authorization` header's value (gRPC metadata or HTTP): why it fails.
    pub fn check_header(&self, header: Option<&[u8]>) -> Result<(), &'static str> {
        let header = header.ok_or("missing authorization: Bearer <token>")?;
        let token = header
            .strip_prefix(b"Bearer ")
            .ok_or("authorization must be Bearer <token>")?;
        if self.accepts(token) {
            Ok(())
        } else {
            Err("invalid API token")
        }
    }

    /// The interceptor's check of one call.
    pub fn check(&self, req: Request<()>) -> Result<Request<()>, Status> {
        let header = req.metadata().get("authorization").map(|h| h.as_bytes());
        self.check_header(header).map_err(Status::unauthenticated)?;
        Ok(req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_listed_bearer_token_passes() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("tokens");
        std::fs::write(&file, "# ops\n0123456789abcdef-one\n\n").unwrap();
        let tokens = ApiTokens::load(Some(&file), &["0123456789abcdef-two".into()])
            .unwrap()
            .unwrap();
        let call = |h: Option<&str>| {
            let mut r = Request::new(());
            if let Some(h) = h {
                r.metadata_mut().insert("authorization", h.parse().unwrap());
            }
            tokens.check(r).map(|_| ()).map_err(|s| s.code())
        };
        assert_eq!(call(Some("Bearer 0123456789abcdef-one")), Ok(()));
        assert_eq!(call(Some("Bearer 0123456789abcdef-two")), Ok(()));
        let refused = Err(tonic::Code::Unauthenticated);
        for bad in [
            None,
            Some("Bearer 0123456789abcdef-on"),
            Some("0123456789abcdef-one"),
            Some("Basic x"),
        ] {
            assert_eq!(call(bad), refused, "{bad:?}");
        }
        assert!(ApiTokens::load(None, &[]).unwrap().is_none());
        assert!(ApiTokens::load(None, &["short".into()]).is_err());
        std::fs::write(&file, "\n# none\n").unwrap();
        assert!(ApiTokens::load(Some(&file), &[]).is_err());
    }
}
