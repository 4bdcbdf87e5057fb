#!/usr/bin/env python3
"""Static checks on alerts/ that promtool does not do. Run by alerts/check.sh, one subcommand
per check; each prints what it found and exits non-zero on the first kind of failure it sees.

  meta       every alert has a severity, summary, description and a runbook_url whose anchor
             is a heading of alerts/RUNBOOK.md
  coverage   every alert has a test where it fires and a test where it stays silent, every
             recording rule a promql_expr_test, every rule file a test file
  names      every series named in the rules and the dashboard is one we know is exported:
             the limiter's (common/src/metric_names.rs), our recording rules, kube-state-metrics
             and kube-apiserver series listed below, and the metrics adapter's (read from its
             source, else the names in tools/unverified-names.txt, which are reported)
  dashboard  the Grafana JSON model: schema version, ${datasource} and policy variables, every
             panel and target on ${datasource}, unique ids, a sane grid
  promql     every dashboard expression, variables expanded, parses: written as recording rules
             into a temporary file and handed to `promtool check rules`
"""

import json
import os
import re
import subprocess
import sys
import tempfile

import yaml

ALERTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROOT = os.path.dirname(ALERTS)
RULES = os.path.join(ALERTS, "rules")
TESTS = os.path.join(ALERTS, "tests")
DASHBOARD = os.path.join(ALERTS, "dashboards", "openclaw.json")
RUNBOOK = os.path.join(ALERTS, "RUNBOOK.md")
METRIC_NAMES_RS = os.path.join(ROOT, "common", "src", "metric_names.rs")
ADAPTER_SRC = os.path.join(ROOT, "metrics-adapter", "src")
UNVERIFIED = os.path.join(ALERTS, "tools", "unverified-names.txt")

# Series exported by other people's software, by their documented names (shared with the
# deploy consistency test).
with open(os.path.join(ROOT, "alerts", "external-series.txt")) as _f:
    EXTERNAL_SERIES = {
        line.strip() for line in _f if line.strip() and not line.lstrip().startswith("#")
    }

# Suffixes the exposition adds: histograms, and counters (prometheus-client appends `_total`).
EXPOSITION_SUFFIXES = ("_bucket", "_sum", "_count", "_total")
PROMQL_KEYWORDS = {
    "and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring", "group_left",
    "group_right", "inf", "nan", "atan2",
}


class CheckFailed(Exception):
    pass


def load_yaml(path):
    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f)


def rule_files():
    return sorted(os.path.join(RULES, f) for f in os.listdir(RULES) if f.endswith(".yaml"))


def test_files():
    return sorted(os.path.join(TESTS, f) for f in os.listdir(TESTS) if f.endswith(".yaml"))


def all_rules():
    """(file, rule) for every rule of every group of every rule file."""
    for path in rule_files():
        for group in load_yaml(path)["groups"]:
            for rule in group["rules"]:
                yield path, rule


def slug(heading):
    """GitHub's anchor for a Markdown heading: lower case, punctuation dropped, spaces to '-'."""
    text = heading.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def runbook_anchors():
    with open(RUNBOOK, encoding="utf-8") as f:
        return {slug(m.group(1)) for m in re.finditer(r"^#+\s+(.*)$", f.read(), re.M)}


def check_meta():
    anchors = runbook_anchors()
    problems = []
    count = 0
    for path, rule in all_rules():
        if "alert" not in rule:
            continue
        count += 1
        name = rule["alert"]
        labels = rule.get("labels") or {}
        ann = rule.get("annotations") or {}
        if labels.get("severity") not in ("warning", "critical"):
            problems.append(f"{name}: severity must be warning or critical, not {labels.get('severity')!r}")
        for key in ("summary", "description", "runbook_url"):
            if not str(ann.get(key, "")).strip():
                problems.append(f"{name}: annotation {key} missing")
        url = str(ann.get("runbook_url", ""))
        m = re.fullmatch(r"alerts/RUNBOOK\.md#([\w-]+)", url)
        if not m:
            problems.append(f"{name}: runbook_url {url!r} is not alerts/RUNBOOK.md#<anchor>")
        elif m.group(1) not in anchors:
            problems.append(f"{name}: RUNBOOK.md has no heading for anchor #{m.group(1)}")
        elif m.group(1) != slug(name):
            problems.append(f"{name}: runbook anchor #{m.group(1)} is not the alert's own section")
        if "for" not in rule:
            problems.append(f"{name}: no `for:`, one bad scrape would page")
    if problems:
        raise CheckFailed("\n".join(problems))
    print(f"{count} alerts: severity, summary, description and runbook anchors present")


def check_coverage():
    alerts = {}
    records = {}
    for path, rule in all_rules():
        if "alert" in rule:
            alerts[rule["alert"]] = os.path.basename(path)
        else:
            records[rule["record"]] = os.path.basename(path)
    fires, silent, tested_exprs, referenced = set(), set(), [], set()
    for path in test_files():
        doc = load_yaml(path)
        for rf in doc.get("rule_files", []):
            referenced.add(os.path.basename(rf))
        for test in doc.get("tests", []):
            for art in test.get("alert_rule_test", []) or []:
                (fires if art.get("exp_alerts") else silent).add(art["alertname"])
            for pet in test.get("promql_expr_test", []) or []:
                if pet.get("exp_samples"):
                    tested_exprs.append(pet["expr"])
    problems = []
    for name in sorted(alerts):
        if name not in fires:
            problems.append(f"{name} ({alerts[name]}): no test where it fires")
        if name not in silent:
            problems.append(f"{name} ({alerts[name]}): no test where it stays silent")
    for name in sorted(records):
        if not any(re.search(r"(?<![\w:])" + re.escape(name) + r"(?![\w:])", e) for e in tested_exprs):
            problems.append(f"{name} ({records[name]}): no promql_expr_test with expected samples")
    for path in rule_files():
        if os.path.basename(path) not in referenced:
            problems.append(f"{os.path.basename(path)}: no test file loads it")
    if problems:
        raise CheckFailed("\n".join(problems))
    print(f"{len(alerts)} alerts each fire and stay silent in a test; "
          f"{len(records)} recording rules each checked by value")


def strip_promql(expr):
    """The expression with strings, label matchers, ranges and grouping label lists removed,
    so that the identifiers left are metric names, functions and keywords."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', expr)
    expr = re.sub(r"\{[^{}]*\}", " ", expr)
    expr = re.sub(r"\[[^\[\]]*\]", " ", expr)
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)", " ", expr)
    return expr


def metric_names(expr):
    names = set()
    for m in re.finditer(r"(?<![\w.:])([a-zA-Z_:][\w:]*)(\s*\()?", strip_promql(expr)):
        word, call = m.group(1), m.group(2)
        if call or word.lower() in PROMQL_KEYWORDS:
            continue
        names.add(word)
    return names


def expand_grafana(expr):
    expr = re.sub(r"\$__(rate_interval|interval|range)\b|\$\{__(rate_interval|interval|range)\}", "5m", expr)
    return re.sub(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)", "x", expr)


def dashboard_targets():
    with open(DASHBOARD, encoding="utf-8") as f:
        dash = json.load(f)
    out = []

    def walk(panels):
        for p in panels:
            for t in p.get("targets", []) or []:
                out.append((p, t))
            walk(p.get("panels", []) or [])

    walk(dash.get("panels", []))
    return dash, out


def known_limiter_names():
    with open(METRIC_NAMES_RS, encoding="utf-8") as f:
        return set(re.findall(r'pub const \w+: &str =\s*"([\w:]+)";', f.read()))


def known_adapter_names():
    """String literals that look like adapter series in the adapter's source."""
    found = set()
    for dirpath, _, files in os.walk(ADAPTER_SRC):
        for fn in files:
            if fn.endswith(".rs"):
                with open(os.path.join(dirpath, fn), encoding="utf-8") as f:
                    found |= set(re.findall(r'"(openclaw_adapter_\w+)"', f.read()))
    return found


def check_names():
    limiter = known_limiter_names()
    if not limiter:
        raise CheckFailed(f"no metric names found in {METRIC_NAMES_RS}")
    records = {rule["record"] for _, rule in all_rules() if "record" in rule}
    adapter = known_adapter_names()
    unverified = set()
    if os.path.exists(UNVERIFIED):
        with open(UNVERIFIED, encoding="utf-8") as f:
            unverified = {ln.split("#")[0].strip() for ln in f} - {""}
    known = limiter | records | adapter | EXTERNAL_SERIES | unverified

    def base(name):
        for suffix in EXPOSITION_SUFFIXES:
            if name.endswith(suffix) and name[: -len(suffix)] in known:
                return name[: -len(suffix)]
        return name

    used = {}
    for path, rule in all_rules():
        where = f"{os.path.basename(path)}:{rule.get('alert') or rule.get('record')}"
        for n in metric_names(rule["expr"]):
            used.setdefault(n, where)
    dash, targets = dashboard_targets()
    for panel, target in targets:
        for n in metric_names(expand_grafana(target["expr"])):
            used.setdefault(n, f"dashboard:{panel['title']}")
    for var in dash["templating"]["list"]:
        q = var.get("query")
        q = q.get("query") if isinstance(q, dict) else q
        m = re.fullmatch(r"label_values\((.*),\s*\w+\)", q or "")
        if m:
            for n in metric_names(expand_grafana(m.group(1))):
                used.setdefault(n, f"dashboard:variable {var['name']}")
    unknown = sorted(n for n in used if base(n) not in known)
    if unknown:
        raise CheckFailed("\n".join(f"{n} (used in {used[n]}) is not a known series" for n in unknown))
    stale = sorted(n for n in unverified if n in adapter or n in limiter)
    if stale:
        raise CheckFailed("\n".join(f"{n} is now exported: remove it from {UNVERIFIED}" for n in stale))
    pending = sorted(n for n in used if base(n) in unverified)
    print(f"{len(used)} series names used, all known")
    for n in pending:
        print(f"  unverified (not yet in metrics-adapter/src): {n}")


def check_dashboard():
    dash, targets = dashboard_targets()
    problems = []
    if not isinstance(dash.get("schemaVersion"), int) or dash["schemaVersion"] < 39:
        problems.append(f"schemaVersion {dash.get('schemaVersion')!r} < 39")
    if not dash.get("uid") or not dash.get("title"):
        problems.append("uid and title are required")
    variables = {v["name"]: v for v in dash.get("templating", {}).get("list", [])}
    ds = variables.get("datasource")
    if not ds or ds.get("type") != "datasource" or ds.get("query") != "prometheus":
        problems.append("a `datasource` variable of type datasource with query prometheus is required")
    if "policy" not in variables or variables["policy"].get("type") != "query":
        problems.append("a `policy` query variable is required")
    ids = []
    want = {"type": "prometheus", "uid": "${datasource}"}

    def walk(panels):
        for p in panels:
            ids.append(p.get("id"))
            g = p.get("gridPos", {})
            if not all(isinstance(g.get(k), int) for k in ("x", "y", "w", "h")) or g["x"] + g["w"] > 24:
                problems.append(f"panel {p.get('title')!r}: bad gridPos {g}")
            if p.get("type") != "row":
                if p.get("datasource") != want:
                    problems.append(f"panel {p.get('title')!r}: datasource is not ${{datasource}}")
                if not p.get("targets"):
                    problems.append(f"panel {p.get('title')!r}: no targets")
                for t in p.get("targets", []):
                    if t.get("datasource") != want:
                        problems.append(f"panel {p.get('title')!r} target {t.get('refId')}: datasource is not ${{datasource}}")
                    if not t.get("expr", "").strip():
                        problems.append(f"panel {p.get('title')!r} target {t.get('refId')}: empty expr")
                    for v in re.findall(r"\$\{?(\w+)", t.get("expr", "")):
                        if not v.startswith("__") and v not in variables:
                            problems.append(f"panel {p.get('title')!r}: unknown variable ${v}")
            walk(p.get("panels", []) or [])

    walk(dash.get("panels", []))
    if len(ids) != len(set(ids)) or None in ids:
        problems.append(f"panel ids must be unique and present: {ids}")
    # Panels must not overlap (rows are 1 high, full width).
    cells = {}
    for p in dash.get("panels", []):
        g = p.get("gridPos", {})
        for yy in range(g.get("y", 0), g.get("y", 0) + g.get("h", 0)):
            for xx in range(g.get("x", 0), g.get("x", 0) + g.get("w", 0)):
                if (xx, yy) in cells:
                    problems.append(f"panels {cells[(xx, yy)]!r} and {p.get('title')!r} overlap")
                cells[(xx, yy)] = p.get("title")
    if problems:
        raise CheckFailed("\n".join(dict.fromkeys(problems)))
    print(f"{len(ids)} panels, {len(targets)} queries, schemaVersion {dash['schemaVersion']}, "
          f"variables {', '.join(variables)}")


def check_promql():
    _, targets = dashboard_targets()
    rules = []
    for panel, target in targets:
        # The record name says which panel a parse error is about.
        rules.append({"record": f"dashboard:panel_{panel['id']}_{target['refId']}",
                      "expr": expand_grafana(target["expr"]),
                      "labels": {"panel": panel["title"], "ref": target["refId"]}})
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "dashboard-queries.yaml")
        with open(path, "w", encoding="utf-8") as f:
            yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}, f, sort_keys=False)
        proc = subprocess.run(["promtool", "check", "rules", path], capture_output=True, text=True)
    if proc.returncode != 0:
        raise CheckFailed(proc.stdout + proc.stderr)
    print(f"{len(rules)} dashboard queries parse (promtool check rules)")


CHECKS = {"meta": check_meta, "coverage": check_coverage, "names": check_names,
          "dashboard": check_dashboard, "promql": check_promql}


def main(argv):
    if len(argv) != 2 or argv[1] not in CHECKS:
        print(f"usage: {argv[0]} {{{'|'.join(CHECKS)}}}", file=sys.stderr)
        return 2
    try:
        CHECKS[argv[1]]()
    except CheckFailed as e:
        print(str(e), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
