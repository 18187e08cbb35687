//! TLS for listeners and for dialing `tls://` addresses, with rustls (ring).
//!
//! Servers offer ALPN `h2` but do not require it: Praefect disables ALPN enforcement because
//! some Gitaly clients do not send it. Clients trust the system's roots (which honour
//! `SSL_CERT_FILE` and `SSL_CERT_DIR`, as Gitaly's clients do), read once per process: the
//! client configuration is built on the first TLS connection and shared by all the others.

use std::io;
use std::path::Path;
use std::sync::{Arc, OnceLock};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::{TlsAcceptor, TlsConnector};

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn invalid(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, message)
}

/// Where a server's key comes from: a file, or PEM text inline in the configuration.
pub enum KeySource<'a> {
    File(&'a Path),
    Pem(&'a str),
}

/// A TLS acceptor for a certificate chain and key. `min_tls13` refuses TLS 1.2.
pub fn acceptor(cert_path: &Path, key: KeySource<'_>, min_tls13: bool) -> io::Result<TlsAcceptor> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert_path)
        .map_err(|e| invalid(format!("reading certificate {}: {e}", cert_path.display())))?
        .collect::<Result<_, _>>()
        .map_err(|e| invalid(format!("parsing certificate {}: {e}", cert_path.display())))?;
    let key = match key {
        KeySource::File(path) => PrivateKeyDer::from_pem_file(path)
            .map_err(|e| invalid(format!("reading key {}: {e}", path.display())))?,
        KeySource::Pem(text) => PrivateKeyDer::from_pem_slice(text.as_bytes())
            .map_err(|e| invalid(format!("parsing inline key: {e}")))?,
    };
    let versions: &[&rustls::SupportedProtocolVersion] = if min_tls13 {
        &[&rustls::version::TLS13]
    } else {
        &[&rustls::version::TLS13, &rustls::version::TLS12]
    };
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(versions)
        .map_err(|e| invalid(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| invalid(format!("certificate and key: {e}")))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// A connector trusting the system roots, shared by every client connection of the process.
///
/// Loading the system roots reads and parses every certificate in the store, which costs far
/// more than the handshake it is for; the configuration is the same for every connection, so
/// it is built on first use and then shared (the connector holds it in an `Arc`). Only a
/// success is kept: while no roots can be found, each connection tries again and fails as it
/// did before.
pub fn connector() -> io::Result<TlsConnector> {
    static SHARED: OnceLock<TlsConnector> = OnceLock::new();
    if let Some(connector) = SHARED.get() {
        return Ok(connector.clone());
    }
    let built = TlsConnector::from(Arc::new(client_config()?));
    Ok(SHARED.get_or_init(|| built).clone())
}

/// The client configuration: the system roots, ALPN `h2`.
fn client_config() -> io::Result<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    let loaded = rustls_native_certs::load_native_certs();
    for cert in loaded.certs {
        let _ = roots.add(cert);
    }
    if roots.is_empty() {
        return Err(invalid("no trusted root certificates found".to_string()));
    }
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| invalid(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// Connects to `host:port` over TLS, verifying the certificate against `host`.
pub async fn connect(target: &str) -> io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let host = target
        .rsplit_once(':')
        .map_or(target, |(host, _)| host)
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let name = ServerName::try_from(host).map_err(|e| invalid(format!("server name: {e}")))?;
    let tcp = TcpStream::connect(target).await?;
    let _ = tcp.set_nodelay(true);
    connector()?.connect(name, tcp).await
}
