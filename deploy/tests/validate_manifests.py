#!/usr/bin/env python3
"""Validates rendered Kubernetes manifests with kubernetes-validate (PyPI), strictly, against
several Kubernetes versions, and fails where the command-line tool only warns.

  validate_manifests.py [--versions 1.30,1.33,latest] [--custom-out FILE] FILE...

- Every object of a built-in API group must validate with strict schemas (unknown fields are
  errors) against every version. `kubernetes-validate` itself prints a WARN and exits 0 when it
  has no schema for a kind, as for the operations guide's removed autoscaling/v2beta2 HPA: here
  that is a failure ("no schema"), because for a built-in group it means the API server would
  refuse the object too.
- Objects of the custom resource groups listed in CUSTOM_GROUPS (Prometheus Operator,
  cert-manager) have no schema in kubernetes-validate; they are written as a JSON array to
  --custom-out for deploy/tests/validate_crs.mjs, and any other unknown group fails.

Prints one line per problem and a summary; exits 1 on any problem.
"""

import argparse
import json
import sys

import yaml
from kubernetes_validate import utils

# Custom resources we ship, and which validator checks them (validate_crs.mjs).
CUSTOM_GROUPS = {"monitoring.coreos.com", "cert-manager.io"}
DEFAULT_VERSIONS = "1.30,1.33,latest"


def group_of(api_version):
    return api_version.split("/")[0] if "/" in api_version else ""


def load(path):
    with open(path, encoding="utf-8") as f:
        return [d for d in yaml.safe_load_all(f) if d]


def name_of(obj):
    meta = obj.get("metadata") or {}
    ns = meta.get("namespace")
    return f"{obj.get('kind')}/{(ns + '/') if ns else ''}{meta.get('name')}"


def versions_from(spec):
    out = []
    for v in spec.split(","):
        v = v.strip()
        out.append(utils.latest_version() if v == "latest" else v)
    return out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--versions", default=DEFAULT_VERSIONS)
    parser.add_argument("--custom-out")
    parser.add_argument("files", nargs="+")
    args = parser.parse_args()
    versions = versions_from(args.versions)

    problems = []
    custom = []
    checked = 0
    for path in args.files:
        for obj in load(path):
            api_version = obj.get("apiVersion", "")
            where = f"{path}: {name_of(obj)} ({api_version})"
            if group_of(api_version) in CUSTOM_GROUPS:
                custom.append({"source": path, "object": obj})
                continue
            for version in versions:
                checked += 1
                try:
                    utils.validate(obj, version, strict=True)
                except utils.ValidationError as e:
                    at = ".".join(str(p) for p in e.path) or "(root)"
                    problems.append(f"{where}: invalid against Kubernetes {version}: {at}: {e.message}")
                except utils.SchemaNotFoundError:
                    problems.append(
                        f"{where}: no schema for kind {obj.get('kind')} in {api_version} in "
                        f"Kubernetes {version}: a built-in API that does not exist (removed or "
                        f"misspelled) or a custom resource no validator knows")
                except utils.VersionNotSupportedError:
                    problems.append(f"kubernetes-validate {utils.__version__} does not know Kubernetes {version}")
                except Exception as e:  # a broken object (no kind, ...) must fail, not crash
                    problems.append(f"{where}: could not be validated: {e}")

    if args.custom_out:
        with open(args.custom_out, "w", encoding="utf-8") as f:
            json.dump(custom, f)
    for p in problems:
        print(f"FAIL {p}")
    print(f"kubernetes-validate {utils.__version__} --strict: {checked} object-version checks "
          f"against {', '.join(versions)}; {len(custom)} custom resources passed on; "
          f"{len(problems)} problems")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
