//! One fetch of a bundle endpoint (SPIFFE Federation spec, section 5): an HTTPS GET of the
//! endpoint URL, authenticated per its profile, whose body is the trust domain's bundle.
//!
//! - https_spiffe: the endpoint's certificate must chain to the trust domain's bundle held
//!   now (the last one fetched, or the one an operator set to start from) and carry the
//!   configured SPIFFE ID (section 5.2.2). Without a bundle there is nothing to
//!   authenticate with, and nothing is fetched.
//! - https_web: web PKI against the system roots (or `SSL_CERT_FILE`), the URL's host
//!   checked as any HTTPS client does (section 5.2.1).

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;

use super::validate::MAX_FEDERATED_BUNDLE_BYTES;
use crate::bundle::Bundle;
use crate::model::federation::{EndpointProfile, FederationRelationship};

/// How long one fetch may take, connection and body included.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a fetch brought back no bundle document.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FetchError {
    /// https_spiffe needs the trust domain's bundle to authenticate the endpoint.
    #[error("no bundle of {trust_domain} is held to authenticate its https_spiffe endpoint: give one with `agentd bundle set` or `agentd federation update --trust-bundle`")]
    NoBundleToAuthenticate { trust_domain: String },
    #[error("connecting to {url}: {reason}")]
    Connect { url: String, reason: String },
    /// The endpoint's certificate was refused: it does not chain to the held bundle (or a
    /// web root), or names another SPIFFE ID or host.
    #[error("{url}: the endpoint's certificate is refused: {reason}")]
    Refused { url: String, reason: String },
    /// The TLS handshake failed otherwise.
    #[error("TLS with {url}: {reason}")]
    Tls { url: String, reason: String },
    #[error("{url}: {reason}")]
    Http { url: String, reason: String },
    #[error("{url} answered HTTP {status}")]
    Status { url: String, status: u16 },
    /// The body was longer than a bundle may be.
    #[error("{url}: the body is over the limit of {limit} bytes")]
    TooLarge { url: String, limit: usize },
    #[error("{url}: no answer within {}s", FETCH_TIMEOUT.as_secs())]
    Timeout { url: String },
}

impl FetchError {
    /// Whether the endpoint answered and was refused (counted as `rejected`: its
    /// certificate, or a body over the limit) rather than nothing usable coming back
    /// (`failed`).
    pub fn is_rejection(&self) -> bool {
        matches!(self, Self::TooLarge { .. } | Self::Refused { .. })
    }
}

/// Fetches the bundle document of `relationship`; `current` is the bundle held for its
/// trust domain now, `web_roots` the roots for https_web.
pub async fn fetch(
    relationship: &FederationRelationship,
    current: Option<&Bundle>,
    web_roots: &[CertificateDer<'static>],
) -> Result<Vec<u8>, FetchError> {
    let url = relationship.bundle_endpoint_url.to_string();
    match tokio::time::timeout(FETCH_TIMEOUT, fetch_inner(relationship, current, web_roots)).await {
        Ok(r) => r,
        Err(_) => Err(FetchError::Timeout { url }),
    }
}

async fn fetch_inner(
    relationship: &FederationRelationship,
    current: Option<&Bundle>,
    web_roots: &[CertificateDer<'static>],
) -> Result<Vec<u8>, FetchError> {
    let endpoint = &relationship.bundle_endpoint_url;
    let url = endpoint.to_string();
    let tls_err = |reason: String| FetchError::Tls {
        url: url.clone(),
        reason,
    };
    let config: Arc<rustls::ClientConfig> = match &relationship.profile {
        EndpointProfile::HttpsSpiffe { endpoint_spiffe_id } => {
            let roots = current
                .map(|b| b.x509_authorities.as_slice())
                .filter(|r| !r.is_empty())
                .ok_or_else(|| FetchError::NoBundleToAuthenticate {
                    trust_domain: relationship.trust_domain.to_string(),
                })?;
            crate::tls::bundle_endpoint_spiffe_client(roots, endpoint_spiffe_id.clone())
                .map_err(|e| tls_err(e.to_string()))?
        }
        EndpointProfile::HttpsWeb => {
            crate::tls::bundle_endpoint_web_client(web_roots).map_err(|e| tls_err(e.to_string()))?
        }
    };
    let tcp = TcpStream::connect((endpoint.host(), endpoint.port()))
        .await
        .map_err(|e| FetchError::Connect {
            url: url.clone(),
            reason: e.to_string(),
        })?;
    let _ = tcp.set_nodelay(true);
    let server_name = ServerName::try_from(endpoint.host().to_string())
        .map_err(|e| tls_err(format!("host {:?}: {e}", endpoint.host())))?;
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(server_name, tcp)
        .await
        .map_err(|e| {
            // The endpoint's certificate was checked and refused (chain, SPIFFE ID, name):
            // a rejection. Anything else in the handshake is a failure to fetch.
            let refused = e
                .get_ref()
                .and_then(|inner| inner.downcast_ref::<rustls::Error>())
                .is_some_and(|r| {
                    matches!(
                        r,
                        rustls::Error::InvalidCertificate(_) | rustls::Error::General(_)
                    )
                });
            if refused {
                FetchError::Refused {
                    url: url.clone(),
                    reason: e.to_string(),
                }
            } else {
                tls_err(e.to_string())
            }
        })?;
    let http_err = |reason: String| FetchError::Http {
        url: url.clone(),
        reason,
    };
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .map_err(|e| http_err(e.to_string()))?;
    let driver = tokio::spawn(conn);
    // RFC 9110, section 7.2: an IPv6 literal in brackets; the port unless it is 443.
    let name = if endpoint.host().contains(':') {
        format!("[{}]", endpoint.host())
    } else {
        endpoint.host().to_string()
    };
    let host = if endpoint.port() == 443 {
        name
    } else {
        format!("{name}:{}", endpoint.port())
    };
    let req = hyper::Request::get(endpoint.path_and_query())
        .header(hyper::header::HOST, host)
        .header(hyper::header::ACCEPT, "application/json")
        .body(String::new())
        .map_err(|e| http_err(e.to_string()))?;
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| http_err(e.to_string()))?;
    let status = resp.status().as_u16();
    if status != 200 {
        driver.abort();
        return Err(FetchError::Status { url, status });
    }
    let mut body = resp.into_body();
    let mut bytes = Vec::new();
    while let Some(frame) =
        futures::future::poll_fn(|cx| hyper::body::Body::poll_frame(Pin::new(&mut body), cx)).await
    {
        let frame = frame.map_err(|e| http_err(format!("reading the body: {e}")))?;
        if let Some(data) = frame.data_ref() {
            bytes.extend_from_slice(data);
        }
        if bytes.len() > MAX_FEDERATED_BUNDLE_BYTES {
            driver.abort();
            return Err(FetchError::TooLarge {
                url,
                limit: MAX_FEDERATED_BUNDLE_BYTES,
            });
        }
    }
    driver.abort();
    Ok(bytes)
}
