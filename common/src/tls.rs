//! PEM certificate material as both TLS endpoints of the workspace read it: the metrics
//! adapter's serving certificate and the limiter's peer (mutual TLS) certificates come from
//! files that cert-manager or a Secret mount rewrites, and are re-read when they change. What a
//! file must hold, and how a problem is worded, is the same for both.

use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;

/// Parses a PEM chain (leaf first) and a private key (PKCS#8, PKCS#1 or SEC1), and checks that
/// the key belongs to the leaf: a half-rotated pair is refused here, not at the next handshake.
pub fn parse_pair(
    provider: &CryptoProvider,
    cert_pem: &[u8],
    key_pem: &[u8],
) -> Result<CertifiedKey, String> {
    let chain = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("certificate file is not valid PEM: {e}"))?;
    if chain.is_empty() {
        return Err("certificate file holds no CERTIFICATE block".to_owned());
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem)
        .map_err(|e| format!("key file holds no usable private key: {e}"))?;
    CertifiedKey::from_der(chain, key, provider)
        .map_err(|e| format!("certificate and key do not fit together: {e}"))
}

/// Parses a PEM bundle of CA certificates into trust roots; every certificate must be usable
/// as one (a bundle that is partly garbage is refused rather than trusted in part).
pub fn parse_ca_bundle(pem: &[u8]) -> Result<RootCertStore, String> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("CA bundle is not valid PEM: {e}"))?;
    if certs.is_empty() {
        return Err("CA bundle holds no CERTIFICATE block".to_owned());
    }
    let mut roots = RootCertStore::empty();
    for (i, cert) in certs.into_iter().enumerate() {
        roots
            .add(cert)
            .map_err(|e| format!("CA bundle certificate {}: {e}", i + 1))?;
    }
    Ok(roots)
}
