//! `kube-system/extension-apiserver-authentication`: the kube-apiserver publishes there which
//! CAs sign client certificates and which front-proxy headers to trust. This module turns its
//! `data` into ready-to-use verifiers; `auth` re-reads it on a timer so CA rotation takes effect.

use std::collections::BTreeMap;
use std::sync::Arc;

use http::HeaderName;
use k8s_openapi::api::core::v1::ConfigMap;
use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::ClientCertVerifier;

use crate::tls::PeerCertificates;

/// Where the kube-apiserver publishes its authentication settings.
pub(crate) const NAMESPACE: &str = "kube-system";
/// Name of the ConfigMap.
pub(crate) const NAME: &str = "extension-apiserver-authentication";

/// What the ConfigMap says, parsed. Either part may be absent (the cluster does not use it).
#[derive(Debug)]
pub(crate) struct Delegation {
    /// `client-ca-file`: end users' client certificates (user = CN, groups = O).
    pub(crate) client_ca: Option<CaPool>,
    /// `requestheader-*`: the front proxy (kube-aggregator) and the headers it sets.
    pub(crate) front_proxy: Option<FrontProxy>,
}

/// Verifies a presented chain against one CA bundle (signature, validity, client-auth usage).
pub(crate) struct CaPool {
    verifier: Arc<dyn ClientCertVerifier>,
    /// Number of CA certificates in the bundle, for logs.
    pub(crate) size: usize,
}

impl std::fmt::Debug for CaPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaPool")
            .field("size", &self.size)
            .finish_non_exhaustive()
    }
}

impl CaPool {
    fn from_pem(key: &str, pem: &str, provider: &Arc<CryptoProvider>) -> Result<Self, String> {
        let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("{key}: not valid PEM: {e}"))?;
        let mut roots = RootCertStore::empty();
        let (added, ignored) = roots.add_parsable_certificates(certs);
        if ignored > 0 {
            return Err(format!(
                "{key}: {ignored} certificate(s) could not be parsed as a CA"
            ));
        }
        if added == 0 {
            return Err(format!("{key}: holds no CERTIFICATE block"));
        }
        let verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                .allow_unauthenticated()
                .build()
                .map_err(|e| format!("{key}: {e}"))?;
        Ok(Self {
            verifier,
            size: added,
        })
    }

    /// Whether `peer` chains to this CA and may be used for client authentication at `now`.
    pub(crate) fn verify(&self, peer: &PeerCertificates, now: UnixTime) -> Result<(), String> {
        self.verifier
            .verify_client_cert(peer.end_entity(), peer.intermediates(), now)
            .map(|_| ())
            .map_err(|e| e.to_string())
    }
}

/// The `requestheader-*` keys.
#[derive(Debug)]
pub(crate) struct FrontProxy {
    pub(crate) ca: CaPool,
    /// Allowed certificate common names; empty means any certificate from `ca`.
    pub(crate) allowed_names: Vec<String>,
    pub(crate) username_headers: Vec<HeaderName>,
    pub(crate) uid_headers: Vec<HeaderName>,
    pub(crate) group_headers: Vec<HeaderName>,
    /// Lowercase header-name prefixes of user extras, e.g. `x-remote-extra-`.
    pub(crate) extra_prefixes: Vec<String>,
}

impl Delegation {
    /// Parses the ConfigMap's `data`; lists every problem found.
    pub(crate) fn parse(
        data: &BTreeMap<String, String>,
        provider: &Arc<CryptoProvider>,
    ) -> Result<Self, Vec<String>> {
        let mut problems = Vec::new();
        let present = |key: &str| data.get(key).filter(|v| !v.trim().is_empty());

        let client_ca = present("client-ca-file").and_then(|pem| {
            CaPool::from_pem("client-ca-file", pem, provider)
                .map_err(|e| problems.push(e))
                .ok()
        });

        let mut list = |key: &str| -> Vec<String> {
            match present(key) {
                None => Vec::new(),
                Some(json) => serde_json::from_str::<Vec<String>>(json).unwrap_or_else(|e| {
                    problems.push(format!("{key}: expected a JSON list of strings: {e}"));
                    Vec::new()
                }),
            }
        };
        let allowed_names = list("requestheader-allowed-names");
        let username = list("requestheader-username-headers");
        let uid = list("requestheader-uid-headers");
        let group = list("requestheader-group-headers");
        let extra = list("requestheader-extra-headers-prefix");

        let mut header_names = |key: &str, names: Vec<String>| -> Vec<HeaderName> {
            names
                .into_iter()
                .filter(|n| !n.trim().is_empty())
                .filter_map(|n| {
                    HeaderName::from_bytes(n.trim().as_bytes())
                        .map_err(|_| {
                            problems.push(format!("{key}: {n:?} is not a valid header name"))
                        })
                        .ok()
                })
                .collect()
        };
        let username_headers = header_names("requestheader-username-headers", username);
        let uid_headers = header_names("requestheader-uid-headers", uid);
        let group_headers = header_names("requestheader-group-headers", group);
        let extra_prefixes = extra
            .into_iter()
            .map(|p| p.trim().to_ascii_lowercase())
            .filter(|p| !p.is_empty())
            .collect();

        let front_proxy = present("requestheader-client-ca-file").and_then(|pem| {
            let ca = CaPool::from_pem("requestheader-client-ca-file", pem, provider)
                .map_err(|e| problems.push(e))
                .ok()?;
            Some(FrontProxy {
                ca,
                allowed_names,
                username_headers,
                uid_headers,
                group_headers,
                extra_prefixes,
            })
        });

        if problems.is_empty() {
            Ok(Self {
                client_ca,
                front_proxy,
            })
        } else {
            Err(problems)
        }
    }

    /// Neither CA: only bearer tokens can authenticate.
    pub(crate) fn empty() -> Self {
        Self {
            client_ca: None,
            front_proxy: None,
        }
    }
}

/// Reads the ConfigMap's data; `Ok(None)` when the cluster does not publish it.
pub(crate) async fn fetch(
    client: &kube::Client,
) -> Result<Option<BTreeMap<String, String>>, kube::Error> {
    let api: kube::Api<ConfigMap> = kube::Api::namespaced(client.clone(), NAMESPACE);
    match api.get_opt(NAME).await? {
        Some(cm) => Ok(Some(cm.data.unwrap_or_default())),
        None => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn provider() -> Arc<CryptoProvider> {
        Arc::new(rustls::crypto::ring::default_provider())
    }

    fn ca_pem() -> String {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.self_signed(&key).unwrap().pem()
    }

    fn data(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn a_kubeadm_style_configmap_parses_into_both_pools_and_the_header_names() {
        let (client, front) = (ca_pem(), ca_pem());
        let parsed = Delegation::parse(
            &data(&[
                ("client-ca-file", &client),
                ("requestheader-client-ca-file", &front),
                ("requestheader-allowed-names", r#"["front-proxy-client"]"#),
                ("requestheader-username-headers", r#"["X-Remote-User"]"#),
                ("requestheader-group-headers", r#"["X-Remote-Group"]"#),
                (
                    "requestheader-extra-headers-prefix",
                    r#"["X-Remote-Extra-"]"#,
                ),
            ]),
            &provider(),
        )
        .unwrap();
        assert_eq!(parsed.client_ca.unwrap().size, 1);
        let fp = parsed.front_proxy.unwrap();
        assert_eq!(fp.allowed_names, ["front-proxy-client"]);
        assert_eq!(
            fp.username_headers,
            [HeaderName::from_static("x-remote-user")]
        );
        assert_eq!(
            fp.group_headers,
            [HeaderName::from_static("x-remote-group")]
        );
        assert_eq!(fp.extra_prefixes, ["x-remote-extra-"]);
        assert!(fp.uid_headers.is_empty());
    }

    #[test]
    fn a_configmap_without_the_ca_keys_disables_certificate_authentication() {
        let parsed = Delegation::parse(&data(&[]), &provider()).unwrap();
        assert!(parsed.client_ca.is_none() && parsed.front_proxy.is_none());
    }

    #[test]
    fn every_problem_is_reported_not_just_the_first() {
        let problems = Delegation::parse(
            &data(&[
                ("client-ca-file", "not pem at all"),
                ("requestheader-client-ca-file", &ca_pem()),
                ("requestheader-allowed-names", "front-proxy-client"),
                ("requestheader-username-headers", r#"["X Remote User"]"#),
            ]),
            &provider(),
        )
        .unwrap_err();
        assert_eq!(problems.len(), 3, "{problems:?}");
        assert!(problems[0].starts_with("client-ca-file"), "{problems:?}");
        assert!(
            problems
                .iter()
                .any(|p| p.starts_with("requestheader-allowed-names"))
        );
        assert!(
            problems
                .iter()
                .any(|p| p.contains("not a valid header name"))
        );
    }
}
