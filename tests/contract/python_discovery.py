"""Discovery through the official Python `kubernetes` client's generated API classes (PyPI),
which ask for the trailing-slash paths kube-apiserver serves: `ApisApi().get_api_versions()`
is `GET /apis/`, `VersionApi().get_code()` is `GET /version/`, and each group's
`get_api_group()` / `get_api_resources()` are `GET /apis/{group}/` and `/apis/{group}/{version}/`
(the client has no class for external.metrics.k8s.io, so those two are asked the way the
generated classes ask, through `ApiClient.param_serialize` and `call_api`, and decoded into the
same models).

Usage: python_discovery.py SERVER_URL
Prints one JSON object on stdout; exits non-zero (with the reason on stderr) on any failure.
Run by tests/tests/kube_clients.rs.
"""

import json
import sys

try:
    from kubernetes import client
except ImportError:
    sys.stderr.write("the Python `kubernetes` client is missing: pip install kubernetes\n")
    sys.exit(3)


def get(api_client, path, response_type):
    """GET `path` the way the generated `get_api_group()` / `get_api_resources()` do."""
    param = api_client.param_serialize(
        method="GET",
        resource_path=path,
        header_params={"Accept": api_client.select_header_accept(["application/json"])},
        auth_settings=["BearerToken"],
    )
    response = api_client.call_api(*param)
    response.read()
    return api_client.response_deserialize(
        response_data=response, response_types_map={"200": response_type}
    ).data


def main() -> int:
    configuration = client.Configuration()
    configuration.host = sys.argv[1]
    api_client = client.ApiClient(configuration)
    groups = client.ApisApi(api_client).get_api_versions()
    version = client.VersionApi(api_client).get_code()
    group = get(api_client, "/apis/external.metrics.k8s.io/", "V1APIGroup")
    resources = get(api_client, "/apis/external.metrics.k8s.io/v1beta1/", "V1APIResourceList")
    print(json.dumps({
        "groups": [
            {"name": g.name, "preferred_version": g.preferred_version.group_version}
            for g in groups.groups
        ],
        "git_version": version.git_version,
        "group": {"name": group.name, "versions": [v.version for v in group.versions]},
        "resources": {
            "group_version": resources.group_version,
            "names": sorted(r.name for r in resources.resources),
        },
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
