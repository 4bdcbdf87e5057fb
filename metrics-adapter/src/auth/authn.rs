//! Who is asking: front-proxy headers (only behind a verified front-proxy certificate), a client
//! certificate from the cluster's client CA, or a bearer token checked by TokenReview; the same
//! order and rules as the Go apiservers' delegated authentication.

use std::collections::BTreeMap;

use http::HeaderMap;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use rustls::pki_types::UnixTime;
use x509_cert::der::oid::ObjectIdentifier;
use x509_cert::der::{Decode as _, Tag};

use super::UserInfo;
use super::configmap::{Delegation, FrontProxy};
use crate::tls::PeerCertificates;

const OID_COMMON_NAME: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.5.4.3");
const OID_ORGANIZATION: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.5.4.10");

/// The outcome of looking at the client certificate.
#[derive(Debug)]
pub(crate) enum CertOutcome {
    /// The certificate (and, for the front proxy, its headers) identify a user.
    User(UserInfo),
    /// A certificate was presented but identifies no one; says why, for the 401 message.
    Untrusted(String),
    /// No certificate.
    Absent,
}

/// Authenticates by client certificate: front proxy first, then the client CA.
pub(crate) fn from_certificate(
    delegation: &Delegation,
    peer: Option<&PeerCertificates>,
    headers: &HeaderMap,
    now: UnixTime,
) -> CertOutcome {
    let Some(peer) = peer else {
        return CertOutcome::Absent;
    };
    let subject = Subject::of(peer);
    let mut why = Vec::new();

    if let Some(fp) = &delegation.front_proxy {
        match fp.ca.verify(peer, now) {
            Ok(()) => match front_proxy_user(fp, &subject, headers) {
                Ok(user) => return CertOutcome::User(user),
                Err(reason) => why.push(reason),
            },
            Err(e) => why.push(format!("not a front-proxy certificate ({e})")),
        }
    }
    if let Some(ca) = &delegation.client_ca {
        match ca.verify(peer, now) {
            Ok(()) => match subject.common_name {
                Some(cn) if !cn.is_empty() => {
                    return CertOutcome::User(UserInfo {
                        name: cn,
                        uid: None,
                        groups: subject.organizations,
                        extra: BTreeMap::new(),
                    });
                }
                _ => why.push("client certificate has no common name (the user name)".to_owned()),
            },
            Err(e) => why.push(format!("not signed by client-ca-file ({e})")),
        }
    }
    if why.is_empty() {
        why.push("the cluster publishes no client CA".to_owned());
    }
    CertOutcome::Untrusted(format!(
        "client certificate not accepted: {}",
        why.join("; ")
    ))
}

/// The user the front proxy asserts, once its certificate has been verified.
fn front_proxy_user(
    fp: &FrontProxy,
    subject: &Subject,
    headers: &HeaderMap,
) -> Result<UserInfo, String> {
    if !fp.allowed_names.is_empty() {
        let cn = subject.common_name.as_deref().unwrap_or("");
        if !fp.allowed_names.iter().any(|allowed| allowed == cn) {
            return Err(format!(
                "front-proxy certificate CN {cn:?} is not in requestheader-allowed-names {:?}",
                fp.allowed_names
            ));
        }
    }
    let first = |names: &[http::HeaderName]| {
        names.iter().find_map(|name| {
            headers
                .get_all(name)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .find(|v| !v.is_empty())
                .map(str::to_owned)
        })
    };
    let Some(name) = first(&fp.username_headers) else {
        return Err(format!(
            "front-proxy certificate without a user header ({:?})",
            fp.username_headers
                .iter()
                .map(|h| h.as_str())
                .collect::<Vec<_>>()
        ));
    };
    let uid = first(&fp.uid_headers);
    let groups = fp
        .group_headers
        .iter()
        .flat_map(|name| headers.get_all(name).iter())
        .filter_map(|v| v.to_str().ok())
        .map(str::to_owned)
        .collect();
    let mut extra: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (header, value) in headers {
        let lower = header.as_str();
        let Some(prefix) = fp
            .extra_prefixes
            .iter()
            .find(|p| lower.starts_with(p.as_str()))
        else {
            continue;
        };
        let key = unescape_extra_key(&lower[prefix.len()..]);
        if key.is_empty() {
            continue;
        }
        if let Ok(value) = value.to_str() {
            extra.entry(key).or_default().push(value.to_owned());
        }
    }
    Ok(UserInfo {
        name,
        uid,
        groups,
        extra,
    })
}

/// Header names cannot carry every character of an extra key, so the front proxy
/// percent-encodes it (`X-Remote-Extra-Acme.com%2Fproject`); keys are lowercase.
fn unescape_extra_key(encoded: &str) -> String {
    let bytes = encoded.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = |at: usize| bytes.get(at).and_then(|b| (*b as char).to_digit(16));
            // An undecodable escape keeps the whole key as sent, as Go's PathUnescape failure does.
            let (Some(hi), Some(lo)) = (hex(i + 1), hex(i + 2)) else {
                return encoded.to_lowercase();
            };
            out.push((hi * 16 + lo) as u8);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out)
        .unwrap_or_else(|_| encoded.to_owned())
        .to_lowercase()
}

/// The parts of a certificate subject Kubernetes reads.
#[derive(Debug, Default)]
struct Subject {
    common_name: Option<String>,
    organizations: Vec<String>,
}

impl Subject {
    fn of(peer: &PeerCertificates) -> Self {
        let Ok(cert) = x509_cert::Certificate::from_der(peer.end_entity().as_ref()) else {
            return Self::default();
        };
        let mut subject = Self::default();
        for attr in cert.tbs_certificate().subject().iter() {
            let text = match attr.value.header().tag() {
                Tag::Utf8String | Tag::PrintableString | Tag::Ia5String | Tag::TeletexString => {
                    std::str::from_utf8(attr.value.value())
                        .ok()
                        .map(str::to_owned)
                }
                _ => None,
            };
            let Some(text) = text else { continue };
            if attr.oid == OID_COMMON_NAME && subject.common_name.is_none() {
                subject.common_name = Some(text);
            } else if attr.oid == OID_ORGANIZATION {
                subject.organizations.push(text);
            }
        }
        subject
    }
}

/// The bearer token of an `Authorization: Bearer ...` header, if any.
pub(crate) fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(http::header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.trim().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// TokenReview's answer, as cached.
#[derive(Debug, Clone)]
pub(crate) enum TokenAnswer {
    Authenticated(UserInfo),
    /// Not authenticated; the API's explanation, if it gave one.
    Rejected(String),
}

/// Asks the API server who `token` belongs to.
pub(crate) async fn review_token(
    client: &kube::Client,
    token: &str,
) -> Result<TokenAnswer, kube::Error> {
    let api: kube::Api<TokenReview> = kube::Api::all(client.clone());
    let review = TokenReview {
        spec: TokenReviewSpec {
            token: Some(token.to_owned()),
            audiences: None,
        },
        ..TokenReview::default()
    };
    let answer = api
        .create(&kube::api::PostParams::default(), &review)
        .await?;
    let status = answer.status.unwrap_or_default();
    match (status.authenticated, status.user) {
        (Some(true), Some(user)) if user.username.as_deref().is_some_and(|u| !u.is_empty()) => {
            Ok(TokenAnswer::Authenticated(UserInfo {
                name: user.username.unwrap_or_default(),
                uid: user.uid.filter(|u| !u.is_empty()),
                groups: user.groups.unwrap_or_default(),
                extra: user.extra.unwrap_or_default(),
            }))
        }
        _ => Ok(TokenAnswer::Rejected(status.error.unwrap_or_default())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extra_keys_are_unescaped_and_lowercased() {
        assert_eq!(unescape_extra_key("acme.com%2Fproject"), "acme.com/project");
        assert_eq!(unescape_extra_key("Scopes"), "scopes");
        assert_eq!(unescape_extra_key("a%2Fb%zz"), "a%2fb%zz");
    }

    #[test]
    fn only_a_bearer_scheme_with_a_token_counts() {
        let mut headers = HeaderMap::new();
        assert_eq!(bearer_token(&headers), None);
        headers.insert(
            http::header::AUTHORIZATION,
            "Bearer abc.def".parse().unwrap(),
        );
        assert_eq!(bearer_token(&headers), Some("abc.def"));
        headers.insert(
            http::header::AUTHORIZATION,
            "bearer   xyz ".parse().unwrap(),
        );
        assert_eq!(bearer_token(&headers), Some("xyz"));
        headers.insert(
            http::header::AUTHORIZATION,
            "Basic Zm9vOmJhcg==".parse().unwrap(),
        );
        assert_eq!(bearer_token(&headers), None);
        headers.insert(http::header::AUTHORIZATION, "Bearer ".parse().unwrap());
        assert_eq!(bearer_token(&headers), None);
    }
}
