//! A real HTTPS client (reqwest over rustls with the ring provider) for talking to the adapter.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use super::pki::Identity;

/// Which HTTP versions the client offers in ALPN.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Alpn {
    Http1,
    Http2,
}

/// A client trusting `ca_pem`, presenting `identity` if given, resolving `name` to `addr`.
/// No connection pooling: each request is a new handshake, so a rotated certificate shows.
pub fn client(
    ca_pem: &str,
    identity: Option<&Identity>,
    alpn: Alpn,
    name: &str,
    addr: SocketAddr,
) -> reqwest::Client {
    build(ca_pem, identity, alpn, name, addr, false)
}

/// Like [`client`], but resuming TLS sessions (abbreviated handshakes) as real clients do.
pub fn resuming_client(
    ca_pem: &str,
    identity: Option<&Identity>,
    alpn: Alpn,
    name: &str,
    addr: SocketAddr,
) -> reqwest::Client {
    build(ca_pem, identity, alpn, name, addr, true)
}

fn build(
    ca_pem: &str,
    identity: Option<&Identity>,
    alpn: Alpn,
    name: &str,
    addr: SocketAddr,
    resume: bool,
) -> reqwest::Client {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let mut config = match identity {
        Some(id) => {
            let chain = CertificateDer::pem_slice_iter(id.cert_pem.as_bytes())
                .collect::<Result<Vec<_>, _>>()
                .unwrap();
            let key = PrivateKeyDer::from_pem_slice(id.key_pem.as_bytes()).unwrap();
            builder.with_client_auth_cert(chain, key).unwrap()
        }
        None => builder.with_no_client_auth(),
    };
    // Full handshakes only: a resumed session carries no certificate, so a rotation would not show.
    if !resume {
        config.resumption = rustls::client::Resumption::disabled();
    }
    config.alpn_protocols = match alpn {
        Alpn::Http1 => vec![b"http/1.1".to_vec()],
        Alpn::Http2 => vec![b"h2".to_vec(), b"http/1.1".to_vec()],
    };
    let mut builder = reqwest::Client::builder()
        .tls_backend_preconfigured(config)
        .tls_info(true)
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(15))
        .resolve(name, addr);
    if alpn == Alpn::Http1 {
        builder = builder.http1_only();
    }
    builder.build().unwrap()
}

/// The leaf certificate the server presented on this response's connection.
pub fn peer_certificate(response: &reqwest::Response) -> Vec<u8> {
    response
        .extensions()
        .get::<reqwest::tls::TlsInfo>()
        .and_then(|info| info.peer_certificate())
        .expect("TLS info with the peer certificate")
        .to_vec()
}
