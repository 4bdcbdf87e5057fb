#!/usr/bin/env python3
"""Mutation check for the promtool unit tests: proves they can fail.

For every rule, makes small wrong versions of it one at a time (halve `for`, move the threshold
10% either way, turn `>` into `>=`, `!=` into `==`, `max by` into `sum by`, double a recording
rule) and runs the rule file's tests against each. A mutant the tests still pass is reported as
SURVIVED. Exit status 1 if any survived that is not listed in EQUIVALENT below (mutants that do
not change behaviour, so no test can tell them apart).

Not part of check.sh (about a minute); run it after changing rules or tests:
    python3 alerts/tools/mutation.py
"""

import copy
import os
import re
import shutil
import subprocess
import sys
import tempfile

import yaml

ALERTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (rule, mutation) pairs that cannot change any outcome.
EQUIVALENT = {
    # sum/sum over duplicated kube-state-metrics series compares like max/max.
    ("OpenClawHPAAtMaxReplicas", "max by -> sum by"),
}

TAIL = re.compile(r"(>=|<=|==|!=|>|<)\s*([0-9.]+)\s*$")


def halve(duration):
    m = re.fullmatch(r"(\d+)([smh])", duration)
    seconds = int(m.group(1)) * {"s": 1, "m": 60, "h": 3600}[m.group(2)]
    return f"{seconds // 2}s"


def mutations(rule):
    expr = rule["expr"].strip()
    out = []
    if "for" in rule:
        out.append(("for / 2", "for", halve(rule["for"])))
    m = TAIL.search(expr)
    if m:
        op, num = m.group(1), m.group(2)
        if float(num) != 0:  # scaling 0 changes nothing
            for factor, label in ((0.9, "threshold -10%"), (1.1, "threshold +10%")):
                out.append((label, "expr", expr[: m.start()] + f"{op} {float(num) * factor:g}"))
        if op == ">":
            out.append(("> -> >=", "expr", expr[: m.start()] + f">= {num}"))
    if re.search(r"\)\s*\n\s*!=\s*\n", expr):
        out.append(("!= -> ==", "expr", re.sub(r"\)(\s*\n\s*)!=(\s*\n)", r")\1==\2", expr, count=1)))
    if "max by" in expr:
        out.append(("max by -> sum by", "expr", expr.replace("max by", "sum by")))
    if "record" in rule:
        out.append(("recorded value x2", "expr", f"2 * ({expr})"))
    return out


def main():
    results = []
    for fn in sorted(os.listdir(os.path.join(ALERTS, "rules"))):
        test = os.path.join("tests", fn.replace(".yaml", ".test.yaml"))
        with open(os.path.join(ALERTS, "rules", fn), encoding="utf-8") as f:
            doc = yaml.safe_load(f)
        for gi, group in enumerate(doc["groups"]):
            for ri, rule in enumerate(group["rules"]):
                name = rule.get("alert") or rule.get("record")
                for label, key, value in mutations(rule):
                    with tempfile.TemporaryDirectory() as tmp:
                        shutil.copytree(ALERTS, os.path.join(tmp, "a"))
                        mutant = copy.deepcopy(doc)
                        mutant["groups"][gi]["rules"][ri][key] = value
                        with open(os.path.join(tmp, "a", "rules", fn), "w", encoding="utf-8") as f:
                            yaml.safe_dump(mutant, f, sort_keys=False)
                        proc = subprocess.run(["promtool", "test", "rules", test],
                                              cwd=os.path.join(tmp, "a"), capture_output=True)
                    killed = proc.returncode != 0
                    results.append((name, label, killed))
                    state = "killed  " if killed else ("equivalent" if (name, label) in EQUIVALENT else "SURVIVED")
                    print(f"{state:10s} {name:42s} {label}", flush=True)
    survivors = [(n, l) for n, l, k in results if not k and (n, l) not in EQUIVALENT]
    killed = sum(k for *_, k in results)
    print(f"{killed} of {len(results)} mutants killed, {len(survivors)} unexpected survivors")
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())
