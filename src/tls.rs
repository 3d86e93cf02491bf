//! TLS for the `mqtts` and `wss` listeners, with rustls and its `ring` provider: the server
//! certificate and key from PEM files, and optionally client certificates checked against a CA,
//! whose common name can stand for the user name; session resumption by tickets (`tickets`)
//! and by session id.

mod tickets;

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use tokio_rustls::TlsAcceptor;

use crate::config::{Listener, TlsConfig};

/// What every TLS listener of a process shares for session resumption, kept across reloads:
/// the random ticket keys when no `ticket_key_file` is configured, and the session-id cache.
pub struct Resumption {
    random_tickets: Arc<dyn rustls::server::ProducesTickets>,
    cache: Arc<rustls::server::ServerSessionMemoryCache>,
}

impl Resumption {
    pub fn new(config: &TlsConfig) -> Result<Resumption, TlsError> {
        let random_tickets =
            rustls::crypto::ring::Ticketer::new().map_err(|e| TlsError { bind: "[tls]".into(), why: e.to_string() })?;
        Ok(Resumption {
            random_tickets,
            cache: rustls::server::ServerSessionMemoryCache::new(config.session_cache.max(1)),
        })
    }

    /// The ticketer the configuration asks for (the key file read again: a reload picks up a
    /// new secret).
    fn ticketer(&self, config: &TlsConfig) -> Result<Arc<dyn rustls::server::ProducesTickets>, TlsError> {
        match &config.ticket_key_file {
            Some(path) => Ok(Arc::new(
                tickets::SharedTicketer::from_file(path, config.ticket_rotate_secs)
                    .map_err(|why| TlsError { bind: "[tls] ticket_key_file".into(), why })?,
            )),
            None => Ok(self.random_tickets.clone()),
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("TLS for listener {bind}: {why}")]
pub struct TlsError {
    pub bind: String,
    pub why: String,
}

fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("{}: {e}", path.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no certificate in it", path.display()));
    }
    Ok(certs)
}

/// Builds the acceptor of a TLS listener from its files, as now on disk (also on reload).
pub fn acceptor(l: &Listener, tls: &TlsConfig, resumption: &Resumption) -> Result<TlsAcceptor, TlsError> {
    let err = |why: String| TlsError { bind: l.bind.clone(), why };
    let (Some(cert), Some(key)) = (&l.cert, &l.key) else {
        return Err(err("needs `cert` and `key`".into()));
    };
    let chain = certificates(cert).map_err(err)?;
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| err(format!("{}: {e}", key.display())))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| err(e.to_string()))?;
    let builder = match &l.ca {
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for c in certificates(ca).map_err(err)? {
                roots.add(c).map_err(|e| err(format!("{}: {e}", ca.display())))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
            let verifier = if l.require_client_cert { verifier } else { verifier.allow_unauthenticated() };
            builder.with_client_cert_verifier(verifier.build().map_err(|e| err(e.to_string()))?)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_single_cert(chain, key).map_err(|e| err(e.to_string()))?;
    config.ticketer = resumption.ticketer(tls)?;
    config.session_storage = resumption.cache.clone();
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// The common name of a verified client certificate.
pub fn common_name(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let cn = cert.subject().iter_common_name().next()?;
    cn.as_str().ok().map(str::to_owned)
}

/// The rustls client configuration: Mozilla's roots, and the configured CA's certificates.
pub fn client_config(ca_file: Option<&std::path::Path>) -> Result<rustls::ClientConfig, String> {
    let mut roots = rustls::RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() };
    if let Some(path) = ca_file {
        let certs = rustls::pki_types::CertificateDer::pem_file_iter(path)
            .map_err(|e| format!("{}: {e}", path.display()))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("{}: {e}", path.display()))?;
        if certs.is_empty() {
            return Err(format!("{}: no certificate in it", path.display()));
        }
        for c in certs {
            roots.add(c).map_err(|e| format!("{}: {e}", path.display()))?;
        }
    }
    Ok(rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// hyper-util's pooled HTTP/1.1 client over rustls (ring), for `http://` and `https://` URLs:
/// the webhook, the auth service and the JWT key set.
pub type HttpsClient = hyper_util::client::legacy::Client<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    http_body_util::Full<bytes::Bytes>,
>;

pub fn https_client(tls: rustls::ClientConfig) -> HttpsClient {
    let connector =
        hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(tls).https_or_http().enable_http1().build();
    hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build(connector)
}

/// A client error with its sources (DNS, refused, TLS), not just "client error".
pub fn error_text(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text = format!("{text}: {s}");
        source = s.source();
    }
    text
}
