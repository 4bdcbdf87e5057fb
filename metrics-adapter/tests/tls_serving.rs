//! The secure port, seen by a real HTTPS client (reqwest over rustls with the ring provider):
//! self-signed serving, certificate files replaced on disk while serving, broken replacements,
//! HTTP/1.1 and HTTP/2 by ALPN, and optional client certificates.
//!
//! Certificates are generated per test with rcgen; files live in a per-test temp dir.

mod auth_support;

use std::path::Path;
use std::time::Duration;

use auth_support::https::{Alpn, client, peer_certificate, resuming_client};
use auth_support::pki::{Ca, Identity};
use auth_support::{eventually, start};
use metrics_adapter::tls::{TlsArgs, TlsConfig};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

const DEADLINE: Duration = Duration::from_secs(15);

fn leaf_der(identity: &Identity) -> Vec<u8> {
    CertificateDer::from_pem_slice(identity.cert_pem.as_bytes())
        .unwrap()
        .to_vec()
}

/// Replaces a file the way a Secret volume does: write aside, then rename over it.
fn replace(path: &Path, contents: &str) {
    let aside = path.with_extension("new");
    std::fs::write(&aside, contents).unwrap();
    std::fs::rename(&aside, path).unwrap();
}

fn file_args(dir: &Path, identity: &Identity) -> TlsArgs {
    let (cert, key) = (dir.join("tls.crt"), dir.join("tls.key"));
    std::fs::write(&cert, &identity.cert_pem).unwrap();
    std::fs::write(&key, &identity.key_pem).unwrap();
    TlsArgs {
        tls_cert_file: Some(cert),
        tls_private_key_file: Some(key),
        tls_reload_interval: Duration::from_millis(50),
        ..TlsArgs::default()
    }
}

async fn served_leaf(http: &reqwest::Client, url: &str) -> Vec<u8> {
    let response = http.get(url).send().await.unwrap();
    assert_eq!(response.status(), 200);
    peer_certificate(&response)
}

#[tokio::test]
async fn self_signed_certificate_verifies_against_the_written_ca_for_every_name_over_http1_and_http2()
 {
    let dir = tempfile::tempdir().unwrap();
    let ca_out = dir.path().join("ca.crt");
    let tls = TlsConfig::from_args(&TlsArgs {
        tls_self_signed_names: vec!["openclaw-metrics-adapter.monitoring.svc".into()],
        tls_self_signed_ca_out: Some(ca_out.clone()),
        ..TlsArgs::default()
    })
    .unwrap();
    let ca_pem = std::fs::read_to_string(&ca_out).unwrap();
    assert_eq!(Some(ca_pem.as_str()), tls.self_signed_ca_pem());
    let adapter = start(tls.clone(), None).await;
    let port = adapter.addr.port();

    for name in [
        "openclaw-metrics-adapter.monitoring.svc",
        "localhost",
        "127.0.0.1",
    ] {
        for (alpn, version) in [
            (Alpn::Http1, reqwest::Version::HTTP_11),
            (Alpn::Http2, reqwest::Version::HTTP_2),
        ] {
            let http = client(&ca_pem, None, alpn, name, adapter.addr);
            let response = http
                .get(format!("https://{name}:{port}/healthz"))
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 200, "{name} {alpn:?}");
            assert_eq!(response.version(), version, "{name} {alpn:?}");
            assert_eq!(
                peer_certificate(&response),
                tls.current_certificate().to_vec()
            );
        }
    }

    // A name the certificate does not carry, and a client that does not trust the CA, fail.
    let wrong_name = client(
        &ca_pem,
        None,
        Alpn::Http1,
        "elsewhere.example",
        adapter.addr,
    );
    assert!(
        wrong_name
            .get(format!("https://elsewhere.example:{port}/healthz"))
            .send()
            .await
            .is_err()
    );
    let other_ca = Ca::new("unrelated-ca").pem();
    let untrusting = client(&other_ca, None, Alpn::Http1, "localhost", adapter.addr);
    assert!(
        untrusting
            .get(format!("https://localhost:{port}/healthz"))
            .send()
            .await
            .is_err()
    );
}

#[tokio::test]
async fn replaced_certificate_files_are_served_to_new_connections() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("serving-ca");
    let (first, second) = (ca.server(&["localhost"]), ca.server(&["localhost"]));
    let args = file_args(dir.path(), &first);
    let tls = TlsConfig::from_args(&args).unwrap();
    let adapter = start(tls.clone(), None).await;
    let http = client(&ca.pem(), None, Alpn::Http1, "localhost", adapter.addr);
    let url = format!("https://localhost:{}/healthz", adapter.addr.port());
    assert_eq!(served_leaf(&http, &url).await, leaf_der(&first));

    // Key first, then certificate: in between the pair does not match, which must not matter.
    replace(args.tls_private_key_file.as_ref().unwrap(), &second.key_pem);
    replace(args.tls_cert_file.as_ref().unwrap(), &second.cert_pem);
    let want = leaf_der(&second);
    eventually("the new certificate is served", DEADLINE, || async {
        (served_leaf(&http, &url).await == want).then_some(())
    })
    .await;
    let status = tls.reload_status();
    assert!(status.reloads >= 1, "{status:?}");
    assert_eq!(status.last_error, None);
    assert_eq!(tls.current_certificate().to_vec(), want);
}

#[tokio::test]
async fn a_broken_replacement_keeps_the_previous_certificate_until_a_good_one_arrives() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("serving-ca");
    let (first, second) = (ca.server(&["localhost"]), ca.server(&["localhost"]));
    let args = file_args(dir.path(), &first);
    let (cert_file, key_file) = (
        args.tls_cert_file.clone().unwrap(),
        args.tls_private_key_file.clone().unwrap(),
    );
    let tls = TlsConfig::from_args(&args).unwrap();
    let adapter = start(tls.clone(), None).await;
    let http = client(&ca.pem(), None, Alpn::Http2, "localhost", adapter.addr);
    let url = format!("https://localhost:{}/healthz", adapter.addr.port());

    // Garbage where the certificate was.
    replace(
        &cert_file,
        "-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydGlmaWNhdGU=\n-----END CERTIFICATE-----\n",
    );
    let failed = eventually("the poller notices the broken file", DEADLINE, || async {
        let status = tls.reload_status();
        (status.failures >= 1).then_some(status)
    })
    .await;
    assert!(failed.last_error.is_some(), "{failed:?}");
    assert_eq!(served_leaf(&http, &url).await, leaf_der(&first));

    // A valid certificate with a key that is not its own.
    replace(&cert_file, &second.cert_pem);
    let mismatched = eventually(
        "the poller notices the mismatched pair",
        DEADLINE,
        || async {
            let status = tls.reload_status();
            (status.failures >= 2).then_some(status)
        },
    )
    .await;
    assert!(
        mismatched
            .last_error
            .as_deref()
            .unwrap_or("")
            .contains("do not fit together"),
        "{mismatched:?}"
    );
    assert_eq!(served_leaf(&http, &url).await, leaf_der(&first));
    assert_eq!(tls.reload_status().reloads, 0);

    // The matching key arrives: the new pair is served and the error clears.
    replace(&key_file, &second.key_pem);
    let want = leaf_der(&second);
    eventually("the repaired pair is served", DEADLINE, || async {
        (served_leaf(&http, &url).await == want).then_some(())
    })
    .await;
    assert_eq!(tls.reload_status().last_error, None);
}

#[test]
fn start_up_rejects_half_given_or_mismatched_files_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("serving-ca");
    let (a, b) = (ca.server(&["localhost"]), ca.server(&["localhost"]));
    let mut args = file_args(dir.path(), &a);
    args.tls_private_key_file = None;
    let err = TlsConfig::from_args(&args).unwrap_err().to_string();
    assert!(err.contains("--tls-private-key-file is missing"), "{err}");

    let args = file_args(
        dir.path(),
        &Identity {
            cert_pem: a.cert_pem.clone(),
            key_pem: b.key_pem.clone(),
        },
    );
    let err = TlsConfig::from_args(&args).unwrap_err().to_string();
    assert!(err.contains("do not fit together"), "{err}");

    let mut args = file_args(dir.path(), &b);
    args.tls_cert_file = Some(dir.path().join("missing.crt"));
    let err = TlsConfig::from_args(&args).unwrap_err().to_string();
    assert!(err.contains("missing.crt"), "{err}");
}

#[tokio::test]
async fn client_certificates_are_optional_and_reach_handlers_with_their_chain() {
    let tls = TlsConfig::from_args(&TlsArgs::default()).unwrap();
    let ca_pem = tls.self_signed_ca_pem().unwrap().to_owned();
    let adapter = start(tls, None).await;
    let url = format!("https://localhost:{}/whoami", adapter.addr.port());

    let anonymous = client(&ca_pem, None, Alpn::Http2, "localhost", adapter.addr);
    let body: serde_json::Value = anonymous
        .get(&url)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(body["peer_certificates"], serde_json::Value::Null);

    // Any CA: the handshake only proves key possession; auth decides trust per request.
    let stranger = Ca::new("some-other-ca").client("someone", &["group"]);
    for alpn in [Alpn::Http1, Alpn::Http2] {
        let with_cert = client(&ca_pem, Some(&stranger), alpn, "localhost", adapter.addr);
        let body: serde_json::Value = with_cert
            .get(&url)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(body["peer_certificates"], 1, "{alpn:?}");
    }
}

#[tokio::test]
async fn a_resumed_tls_session_still_carries_the_client_certificate() {
    let tls = TlsConfig::from_args(&TlsArgs::default()).unwrap();
    let ca_pem = tls.self_signed_ca_pem().unwrap().to_owned();
    let adapter = start(tls, None).await;
    let url = format!("https://localhost:{}/whoami", adapter.addr.port());
    let proxy = Ca::new("front-proxy-ca").client("front-proxy-client", &[]);
    for alpn in [Alpn::Http1, Alpn::Http2] {
        // One client, no pooled connections: every request is a new connection, all but the
        // first resumed. Each must still show the certificate, or front-proxy identity is lost.
        let http = resuming_client(&ca_pem, Some(&proxy), alpn, "localhost", adapter.addr);
        for attempt in 0..4 {
            let body: serde_json::Value =
                http.get(&url).send().await.unwrap().json().await.unwrap();
            assert_eq!(body["peer_certificates"], 1, "{alpn:?} attempt {attempt}");
        }
    }
}
