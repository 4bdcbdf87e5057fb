//! May they: the request's attributes, as the Go apiservers' RequestInfo derives them, checked
//! by a SubjectAccessReview.
//!
//! The list call `/apis/external.metrics.k8s.io/v1beta1/namespaces/{ns}/{metric}` becomes
//! resource `{metric}` in group `external.metrics.k8s.io`, version `v1beta1`, namespace `{ns}`,
//! verb `list` (what RBAC rules for the HPA name); discovery paths such as `/apis` become
//! non-resource requests with the lowercase HTTP method as verb.

use http::Method;
use k8s_openapi::api::authorization::v1::{
    NonResourceAttributes, ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};

use super::UserInfo;

/// What the request does, in RBAC terms.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Attributes {
    Resource(Box<ResourceAttributes>),
    NonResource(NonResourceAttributes),
}

/// A path segment percent-decoded exactly as axum's `Path` extractor decodes it for the
/// handlers, so the attributes name what is served. (A segment that is not UTF-8 once decoded
/// is refused by the extractor and never served; it is reviewed lossily decoded.)
fn decode(segment: &str) -> String {
    percent_encoding::percent_decode_str(segment)
        .decode_utf8_lossy()
        .into_owned()
}

/// Derives the attributes from method and the request's raw path (Go's
/// `RequestInfoFactory.NewRequestInfo`). Go apiservers decode the path before looking at it,
/// and so does this: every segment is percent-decoded, so `namespaces/secret%2Dns` is reviewed
/// as namespace `secret-ns`, the namespace the handler serves.
pub(crate) fn attributes(method: &Method, raw_path: &str, query: Option<&str>) -> Attributes {
    let decoded: Vec<String> = raw_path.split('/').map(decode).collect();
    let path = decoded.join("/");
    let non_resource = || {
        Attributes::NonResource(NonResourceAttributes {
            path: Some(path.clone()),
            verb: Some(method.as_str().to_ascii_lowercase()),
        })
    };
    // Split on the raw path's slashes: an encoded `%2F` stays inside its segment, as in the
    // router, which matches raw segments.
    let trimmed = raw_path.trim_matches('/');
    let parts: Vec<String> = if trimmed.is_empty() {
        vec![String::new()]
    } else {
        trimmed.split('/').map(decode).collect()
    };
    let parts: Vec<&str> = parts.iter().map(String::as_str).collect();
    let (group, version, mut rest) = match parts.as_slice() {
        ["apis", group, version, rest @ ..] if !rest.is_empty() => (*group, *version, rest),
        ["api", version, rest @ ..] if !rest.is_empty() => ("", *version, rest),
        _ => return non_resource(),
    };
    let mut verb = match *method {
        Method::POST => "create",
        Method::GET | Method::HEAD => "get",
        Method::PUT => "update",
        Method::PATCH => "patch",
        Method::DELETE => "delete",
        _ => "",
    };
    if verb.is_empty() {
        return non_resource();
    }
    let mut namespace = None;
    if rest[0] == "namespaces" && rest.len() > 1 {
        namespace = Some(rest[1].to_owned());
        if rest.len() > 2 && !matches!(rest[2], "status" | "finalize") {
            rest = &rest[2..];
        }
    }
    let resource = rest[0].to_owned();
    let name = rest
        .get(1)
        .map(|s| (*s).to_owned())
        .filter(|s| !s.is_empty());
    let subresource = rest
        .get(2)
        .map(|s| (*s).to_owned())
        .filter(|s| !s.is_empty());
    if name.is_none() {
        let watch =
            query.is_some_and(|q| q.split('&').any(|kv| kv == "watch=true" || kv == "watch=1"));
        verb = match verb {
            "get" if watch => "watch",
            "get" => "list",
            "delete" => "deletecollection",
            other => other,
        };
    }
    Attributes::Resource(Box::new(ResourceAttributes {
        group: Some(group.to_owned()),
        version: Some(version.to_owned()),
        resource: Some(resource),
        namespace,
        name,
        subresource,
        verb: Some(verb.to_owned()),
        ..ResourceAttributes::default()
    }))
}

/// The SubjectAccessReview spec for `user` doing `attributes`.
pub(crate) fn review_spec(user: &UserInfo, attributes: &Attributes) -> SubjectAccessReviewSpec {
    let (resource_attributes, non_resource_attributes) = match attributes {
        Attributes::Resource(r) => (Some((**r).clone()), None),
        Attributes::NonResource(n) => (None, Some(n.clone())),
    };
    SubjectAccessReviewSpec {
        user: Some(user.name.clone()),
        uid: user.uid.clone(),
        groups: Some(user.groups.clone()),
        extra: (!user.extra.is_empty()).then(|| user.extra.clone()),
        resource_attributes,
        non_resource_attributes,
    }
}

/// SubjectAccessReview's answer, as cached.
#[derive(Debug, Clone)]
pub(crate) struct Decision {
    pub(crate) allowed: bool,
    /// The authorizer's reason or evaluation error, possibly empty.
    pub(crate) reason: String,
}

/// Asks the API server whether the spec's user may do the spec's request.
pub(crate) async fn review(
    client: &kube::Client,
    spec: SubjectAccessReviewSpec,
) -> Result<Decision, kube::Error> {
    let api: kube::Api<SubjectAccessReview> = kube::Api::all(client.clone());
    let review = SubjectAccessReview {
        spec,
        ..SubjectAccessReview::default()
    };
    let answer = api
        .create(&kube::api::PostParams::default(), &review)
        .await?;
    let status = answer.status.unwrap_or_default();
    let reason = [status.reason, status.evaluation_error]
        .into_iter()
        .flatten()
        .filter(|s| !s.is_empty())
        .collect::<Vec<_>>()
        .join("; ");
    Ok(Decision {
        allowed: status.allowed && status.denied != Some(true),
        reason,
    })
}

/// The 403 message, worded as kube-apiserver words it so SREs recognise it.
pub(crate) fn forbidden_message(user: &UserInfo, attributes: &Attributes, reason: &str) -> String {
    let mut message = match attributes {
        Attributes::Resource(r) => {
            let group = r.group.as_deref().unwrap_or("");
            let mut resource = r.resource.clone().unwrap_or_default();
            let qualified = if group.is_empty() {
                resource.clone()
            } else {
                format!("{resource}.{group}")
            };
            if let Some(sub) = &r.subresource {
                resource = format!("{resource}/{sub}");
            }
            let subject = match &r.name {
                Some(name) => format!("{qualified} {name:?} is forbidden"),
                None => format!("{qualified} is forbidden"),
            };
            let scope = match &r.namespace {
                Some(ns) => format!("in the namespace {ns:?}"),
                None => "at the cluster scope".to_owned(),
            };
            format!(
                "{subject}: User {:?} cannot {} resource {resource:?} in API group {group:?} {scope}",
                user.name,
                r.verb.as_deref().unwrap_or(""),
            )
        }
        Attributes::NonResource(n) => format!(
            "forbidden: User {:?} cannot {} path {:?}",
            user.name,
            n.verb.as_deref().unwrap_or(""),
            n.path.as_deref().unwrap_or("")
        ),
    };
    if !reason.is_empty() {
        message.push_str(": ");
        message.push_str(reason);
    }
    message
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resource(path: &str) -> ResourceAttributes {
        match attributes(&Method::GET, path, None) {
            Attributes::Resource(r) => *r,
            other => panic!("{path}: {other:?}"),
        }
    }

    #[test]
    fn the_list_call_is_a_namespaced_list_of_the_metric() {
        let r = resource(
            "/apis/external.metrics.k8s.io/v1beta1/namespaces/edge/openclaw_requests_per_second",
        );
        assert_eq!(r.group.as_deref(), Some("external.metrics.k8s.io"));
        assert_eq!(r.version.as_deref(), Some("v1beta1"));
        assert_eq!(r.resource.as_deref(), Some("openclaw_requests_per_second"));
        assert_eq!(r.namespace.as_deref(), Some("edge"));
        assert_eq!(r.verb.as_deref(), Some("list"));
        assert_eq!(r.name, None);
    }

    #[test]
    fn discovery_paths_are_non_resource_gets() {
        for path in [
            "/apis",
            "/apis/external.metrics.k8s.io",
            "/apis/external.metrics.k8s.io/v1beta1",
            "/apis/",
            "/apis/external.metrics.k8s.io/v1beta1/",
            "/metrics",
        ] {
            assert_eq!(
                attributes(&Method::GET, path, None),
                Attributes::NonResource(NonResourceAttributes {
                    path: Some(path.to_owned()),
                    verb: Some("get".to_owned())
                }),
                "{path}"
            );
        }
    }

    #[test]
    fn a_named_resource_is_a_get_and_watch_is_recognised() {
        let r = resource("/apis/external.metrics.k8s.io/v1beta1/namespaces/edge/m/item");
        assert_eq!(
            (r.verb.as_deref(), r.name.as_deref()),
            (Some("get"), Some("item"))
        );
        let Attributes::Resource(w) =
            attributes(&Method::GET, "/apis/g/v1/things", Some("watch=true"))
        else {
            panic!()
        };
        assert_eq!((w.verb.as_deref(), w.namespace), (Some("watch"), None));
    }

    #[test]
    fn percent_encoded_segments_are_reviewed_decoded_as_they_are_served() {
        let r = resource(
            "/apis/external.metrics.k8s.io/v1beta1/namespaces/secret%2Dns/openclaw%5Frequests_per_second",
        );
        assert_eq!(r.namespace.as_deref(), Some("secret-ns"));
        assert_eq!(r.resource.as_deref(), Some("openclaw_requests_per_second"));
        // An encoded slash stays inside its segment, as the router's match keeps it.
        let r = resource("/apis/external.metrics.k8s.io/v1beta1/namespaces/a%2Fb/m");
        assert_eq!(
            (r.namespace.as_deref(), r.resource.as_deref()),
            (Some("a/b"), Some("m"))
        );
        assert_eq!(
            attributes(&Method::GET, "/ap%69s/", None),
            Attributes::NonResource(NonResourceAttributes {
                path: Some("/apis/".to_owned()),
                verb: Some("get".to_owned())
            })
        );
    }

    #[test]
    fn forbidden_messages_read_like_kube_apiserver_ones() {
        let user = UserInfo {
            name: "bob".into(),
            ..UserInfo::default()
        };
        let attrs = attributes(
            &Method::GET,
            "/apis/external.metrics.k8s.io/v1beta1/namespaces/edge/m",
            None,
        );
        assert_eq!(
            forbidden_message(&user, &attrs, "no RBAC policy matched"),
            "m.external.metrics.k8s.io is forbidden: User \"bob\" cannot list resource \"m\" in API group \
             \"external.metrics.k8s.io\" in the namespace \"edge\": no RBAC policy matched"
        );
        let attrs = attributes(&Method::GET, "/apis", None);
        assert_eq!(
            forbidden_message(&user, &attrs, ""),
            "forbidden: User \"bob\" cannot get path \"/apis\""
        );
    }
}
