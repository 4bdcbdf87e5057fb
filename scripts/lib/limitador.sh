# Sourced by scripts/bench-rls.sh and scripts/bench-envoy.sh: limitador's RLS, in memory, with one
# limit that never refuses (the benchmarks measure the cost of asking, not of refusing).
#
# start_limitador CPU: runs "$LIMITADOR_BIN" pinned to CPU, its files in "$WORK", and waits until
# it answers. Sets LIMITADOR_PID, LIMITADOR_RLS_PORT and LIMITADOR_HTTP_PORT. Needs the caller's
# `die`; the caller stops LIMITADOR_PID.
start_limitador() {
    local cpu=$1
    [ -x "$LIMITADOR_BIN" ] || die "LIMITADOR_BIN=$LIMITADOR_BIN is not an executable"
    # limitador takes fixed ports: ask the kernel for two free ones.
    read -r LIMITADOR_RLS_PORT LIMITADOR_HTTP_PORT < <(python3 -c 'import socket
s = [socket.socket() for _ in range(2)]
for x in s: x.bind(("127.0.0.1", 0))
print(*[x.getsockname()[1] for x in s])')
    cat >"$WORK/limits.yaml" <<'LIMITS'
- namespace: edge
  max_value: 1000000000
  seconds: 1
  conditions: []
  variables:
    - descriptors[0].client_id
LIMITS
    taskset -c "$cpu" "$LIMITADOR_BIN" -b 127.0.0.1 -p "$LIMITADOR_RLS_PORT" -B 127.0.0.1 \
        -P "$LIMITADOR_HTTP_PORT" "$WORK/limits.yaml" memory >"$WORK/limitador.log" 2>&1 &
    LIMITADOR_PID=$!
    local _
    for _ in $(seq 100); do
        curl -sf "http://127.0.0.1:$LIMITADOR_HTTP_PORT/status" >/dev/null && return 0
        kill -0 "$LIMITADOR_PID" 2>/dev/null || die "limitador exited: $(tail -5 "$WORK/limitador.log")"
        sleep 0.1
    done
    die "limitador did not answer within 10 s: $(tail -5 "$WORK/limitador.log")"
}
