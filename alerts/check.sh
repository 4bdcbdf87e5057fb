#!/usr/bin/env bash
# Checks everything under alerts/: rule syntax, rule unit tests, rule metadata and test coverage,
# series names, the Grafana dashboard and its PromQL. Prints one line per check and a final
# "N passed, M failed"; exits non-zero if any check failed.
#
# Needs promtool (Debian's `prometheus` package) and Python 3 with PyYAML; installs them when
# missing (as root, like CI).
set -uo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here" || exit 2

if ! command -v promtool >/dev/null 2>&1; then
    echo "promtool missing: installing Debian's prometheus package" >&2
    export DEBIAN_FRONTEND=noninteractive
    { apt-get update -qq && apt-get install -y -qq prometheus; } >&2 || {
        echo "could not install promtool" >&2
        exit 2
    }
fi
if ! python3 -c 'import yaml' 2>/dev/null; then
    echo "PyYAML missing: installing it" >&2
    python3 -m pip install --quiet pyyaml >&2 || { echo "could not install PyYAML" >&2; exit 2; }
fi

passed=0
failed=0
log="$(mktemp)"
trap 'rm -f "$log"' EXIT

check() {
    local name="$1"
    shift
    if "$@" >"$log" 2>&1; then
        passed=$((passed + 1))
        echo "ok    $name"
    else
        failed=$((failed + 1))
        echo "FAIL  $name"
        sed 's/^/      /' "$log"
    fi
}

check "promtool check rules rules/*.yaml" promtool check rules rules/*.yaml
for t in tests/*.yaml; do
    check "promtool test rules $t" promtool test rules "$t"
done
check "every alert has severity, summary, description and a runbook section" python3 tools/checks.py meta
check "every alert fires and stays silent in a test; every recording rule is tested" python3 tools/checks.py coverage
check "every series used by rules and dashboard is exported" python3 tools/checks.py names
check "dashboard JSON model (schema, \${datasource}, policy variable, ids, grid)" python3 tools/checks.py dashboard
check "every dashboard query is valid PromQL (promtool)" python3 tools/checks.py promql

echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
