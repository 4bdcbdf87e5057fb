"""Drive the metrics adapter with the official Python `kubernetes` client (PyPI), which no one
here wrote: its dynamic client discovers the API the way generic Kubernetes tooling does.

Usage: python_dynamic_client.py SERVER_URL METRIC LABEL_SELECTOR
Prints one JSON object on stdout; exits non-zero (with the reason on stderr) on any failure.
Run by tests/tests/kube_clients.rs.
"""

import json
import sys
import tempfile

try:
    from kubernetes import client, dynamic
    from kubernetes.client.rest import ApiException
    from kubernetes.dynamic.resource import ResourceList
except ImportError:
    sys.stderr.write("the Python `kubernetes` client is missing: pip install kubernetes\n")
    sys.exit(3)


def main() -> int:
    server, metric, selector = sys.argv[1], sys.argv[2], sys.argv[3]
    configuration = client.Configuration()
    configuration.host = server
    api_client = client.ApiClient(configuration)
    with tempfile.TemporaryDirectory() as cache_dir:
        dyn = dynamic.DynamicClient(api_client, cache_file=f"{cache_dir}/discovery.json")
        # Every external metric has kind ExternalMetricValueList (as with any provider of this
        # API), so `resources.get(name=...)` trips over the client's synthetic `...ListList`
        # entries; look the kind up and pick the metric by name instead.
        candidates = dyn.resources.search(
            group="external.metrics.k8s.io", api_version="v1beta1", kind="ExternalMetricValueList"
        )
        matches = [r for r in candidates if not isinstance(r, ResourceList) and r.name == metric]
        if len(matches) != 1:
            sys.stderr.write(f"discovery found {len(matches)} resources named {metric}\n")
            return 1
        resource = matches[0]
        listed = resource.client.get(resource, namespace="default", label_selector=selector)
        try:
            resource.client.get(resource, namespace="default", label_selector="no such label!")
            bad_selector_status = None
        except ApiException as e:
            bad_selector_status = {"status": e.status, "body": json.loads(e.body)}
        out = {
            "resource": {
                "name": resource.name,
                "kind": resource.kind,
                "namespaced": resource.namespaced,
                "verbs": resource.verbs,
                "group_version": resource.group_version,
            },
            "resources_in_group": sorted(
                r.name
                for r in dyn.resources.search(group="external.metrics.k8s.io", api_version="v1beta1")
                if not isinstance(r, ResourceList)
            ),
            "list": listed.to_dict(),
            "bad_selector": bad_selector_status,
        }
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
