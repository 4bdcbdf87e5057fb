#!/usr/bin/env python3
"""Checks the HPAs of rendered manifests against the metrics adapter's configuration, offline.

  check_hpa_metrics.py [--adapter-config FILE] [--expect FILE=NAME,NAME]... FILE...

For every HorizontalPodAutoscaler in FILE (a `kubectl kustomize` output):
- each External metric is one the adapter's config serves (a rule of that name), and its
  selector names only labels the rule lists in `selectable_labels`: the adapter answers any
  other key with 400, and the HPA would never scale on that metric;
- each selector is one the HPA controller can send (In/NotIn with values, Exists/DoesNotExist
  without);
- with --expect FILE=NAMES, the HPA of FILE lists exactly those metrics (the base only the
  request rate, components/scale-on-depletion both);
- a metric named in several files has the same selector and target in each (the component
  restates the base's request metric, since HPA metric lists are replaced as a whole).

The adapter config is the ConfigMap openclaw-metrics-adapter-config rendered in the same FILE,
or --adapter-config for a FILE without it (the fixtures). The consistency test
(tests/tests/deploy_consistency.rs) asks the real adapter with these selectors; this check needs
no build.

Prints one line per problem and a summary; exits 1 on any problem.
"""

import argparse
import json
import sys

import yaml

CONFIGMAP = "openclaw-metrics-adapter-config"


def load(path):
    with open(path, encoding="utf-8") as f:
        return [d for d in yaml.safe_load_all(f) if d]


def rules_of(config_text, where):
    config = yaml.safe_load(config_text) or {}
    rules = {}
    for rule in config.get("rules") or []:
        rules[rule["name"]] = set(rule.get("selectable_labels") or [])
    if not rules:
        raise ValueError(f"{where}: the adapter config has no rules")
    return rules


def selector_problems(sel):
    """Keys of a metav1.LabelSelector, and what the controller would refuse in it."""
    keys, problems = set(), []
    for k in (sel.get("matchLabels") or {}):
        keys.add(k)
    for e in sel.get("matchExpressions") or []:
        keys.add(e.get("key"))
        op, values = e.get("operator"), e.get("values") or []
        if op in ("In", "NotIn") and not values:
            problems.append(f"{e.get('key')} {op} without values")
        elif op in ("Exists", "DoesNotExist") and values:
            problems.append(f"{e.get('key')} {op} with values")
        elif op not in ("In", "NotIn", "Exists", "DoesNotExist"):
            problems.append(f"{e.get('key')}: unknown operator {op!r}")
    return keys, problems


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--adapter-config")
    parser.add_argument("--expect", action="append", default=[], metavar="FILE=NAMES")
    parser.add_argument("files", nargs="+")
    args = parser.parse_args()
    expect = {}
    for e in args.expect:
        path, _, names = e.partition("=")
        expect[path] = set(n for n in names.split(",") if n)

    problems = []
    seen = {}  # metric name -> (selector and target as JSON, first file)
    hpas = 0
    for path in args.files:
        docs = load(path)
        if args.adapter_config:
            with open(args.adapter_config, encoding="utf-8") as f:
                config_text, config_where = f.read(), args.adapter_config
        else:
            cms = [d for d in docs if d.get("kind") == "ConfigMap"
                   and (d.get("metadata") or {}).get("name") == CONFIGMAP]
            if len(cms) != 1:
                problems.append(f"{path}: expected one ConfigMap {CONFIGMAP}, found {len(cms)}")
                continue
            config_text, config_where = cms[0]["data"]["config.yaml"], f"{path}: {CONFIGMAP}"
        try:
            rules = rules_of(config_text, config_where)
        except (ValueError, KeyError, TypeError, yaml.YAMLError) as e:
            problems.append(f"{config_where}: unreadable adapter config: {e}")
            continue
        for hpa in (d for d in docs if d.get("kind") == "HorizontalPodAutoscaler"):
            hpas += 1
            name = f"{path}: HPA {(hpa.get('metadata') or {}).get('name')}"
            names = set()
            for i, m in enumerate((hpa.get("spec") or {}).get("metrics") or []):
                if m.get("type") != "External":
                    problems.append(f"{name}: spec.metrics[{i}] is {m.get('type')}, not External")
                    continue
                metric = m["external"]["metric"]
                mname = metric["name"]
                names.add(mname)
                if mname not in rules:
                    problems.append(f"{name}: {mname} is not served by the adapter config "
                                    f"(rules: {', '.join(sorted(rules))})")
                    continue
                keys, bad = selector_problems(metric.get("selector") or {})
                problems += [f"{name}: {mname}: selector {b}" for b in bad]
                outside = keys - rules[mname]
                if outside:
                    problems.append(
                        f"{name}: {mname}: selector keys {sorted(outside)} are not in the "
                        f"adapter's selectable_labels {sorted(rules[mname])} (answered 400)")
                shape = json.dumps({"selector": metric.get("selector"),
                                    "target": m["external"].get("target")}, sort_keys=True)
                first = seen.setdefault(mname, (shape, path))
                if first[0] != shape:
                    problems.append(f"{name}: {mname} differs from its definition in {first[1]}: "
                                    f"{shape} vs {first[0]}")
            if path in expect and names != expect[path]:
                problems.append(f"{name}: metrics {sorted(names)}, expected {sorted(expect[path])}")
    missing = [p for p in expect if p not in args.files]
    problems += [f"--expect names {p}, which is not checked" for p in missing]
    if hpas == 0:
        problems.append("no HorizontalPodAutoscaler found")

    for p in problems:
        print(f"FAIL {p}")
    print(f"{hpas} HPAs checked against the adapter config; {len(problems)} problems")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
