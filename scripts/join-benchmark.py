#!/usr/bin/env python3
"""A replica joining a cluster that holds N spent keys: time to /ready, the keys it knows then, and
its peak RSS against a member's steady state.

    cargo build --release -p openclaw-limiter
    scripts/join-benchmark.py                       # 3 holders, 1 000 000 keys, target/release
    scripts/join-benchmark.py --holders 1 --keys 300000 --binary path/to/openclaw-limiter

Issue 12's target: a new replica joins a 3-replica cluster holding 1M active keys and turns ready
with the full view in 10 s or less, its peak RSS during the join at most twice its steady state.

A benchmark, not a test (not run in CI). Starts --holders limiter processes on 127.0.0.1 (port 0)
replicating to each other (a peers file), fills them through /rate/batch, batches spread over
them in turn (keys spend 3 of 10 tokens refilled over an hour, so none is full again and
forgotten during the run), waits until every holder knows every key, then starts a joiner with
the holders as its peers and polls its /ready. Steady state: a holder's RSS (the same keys, held
for a while). Every process is stopped on exit, failure included; logs go to a temporary
directory that is printed. Figures: docs/benchmarks.md.
"""
import argparse
import http.client
import json
import os
import random
import re
import subprocess
import tempfile
import time

SECRET = "join-benchmark-secret-0123"


def start(binary, name, peers, logs):
    """Start a limiter; `peers` is either a comma-separated list or ("file", path)."""
    env = dict(
        os.environ,
        OPENCLAW_LISTEN="127.0.0.1:0",
        OPENCLAW_PEER_LISTEN="127.0.0.1:0",
        OPENCLAW_PEER_SECRET=SECRET,
        OPENCLAW_NODE_ID=name,
        OPENCLAW_ANTI_ENTROPY_INTERVAL_MS="600000",
        OPENCLAW_READY_MAX_WAIT_MS="60000",
        BUCKET_CAPACITY="10",
        REFILL_INTERVAL_MS="3600000",
        RUST_LOG="info",
    )
    if isinstance(peers, tuple):
        env["OPENCLAW_PEERS_FILE"] = peers[1]
    else:
        env["OPENCLAW_PEERS"] = peers
    log = open(os.path.join(logs, f"{name}.log"), "w")
    process = subprocess.Popen([binary], env=env, stdout=subprocess.PIPE, stderr=log, text=True)
    api = peer = None
    for line in process.stdout:
        if m := re.search(r"listening api=http://(\S+)", line):
            api = m.group(1)
        if m := re.search(r"listening peer=http://(\S+)", line):
            peer = m.group(1)
        if api and peer:
            return process, api, peer
    raise RuntimeError(f"{name} exited before listening (see {log.name})")


def connect(api):
    host, port = api.rsplit(":", 1)
    return http.client.HTTPConnection(host, int(port), timeout=60)


def get(api, path):
    connection = connect(api)
    connection.request("GET", path)
    response = connection.getresponse()
    return response.status, response.read()


def rss_mib(pid, field):
    with open(f"/proc/{pid}/status") as status:
        return next(int(l.split()[1]) for l in status if l.startswith(field)) / 1024


def keys_of(api):
    return json.loads(get(api, "/status")[1])["keys"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", type=int, default=1_000_000)
    parser.add_argument("--holders", type=int, default=3)
    parser.add_argument("--binary", default="target/release/openclaw-limiter")
    parser.add_argument("--timeout-s", type=float, default=120)
    args = parser.parse_args()
    logs = tempfile.mkdtemp(prefix="join-benchmark-")
    processes = []
    try:
        peers_file = os.path.join(logs, "peers")
        open(peers_file, "w").close()
        holders = []
        for i in range(args.holders):
            process, api, peer = start(args.binary, f"holder-{i}", ("file", peers_file), logs)
            processes.append(process)
            holders.append((process, api, peer))
        with open(peers_file + ".new", "w") as f:
            f.write("\n".join(peer for _, _, peer in holders) + "\n")
        os.replace(peers_file + ".new", peers_file)
        connections = [connect(api) for _, api, _ in holders]
        began = time.monotonic()
        for n, first in enumerate(range(0, args.keys, 1000)):
            batch = [{"key": f"client-{i:07}", "cost": 3} for i in range(first, min(args.keys, first + 1000))]
            connection = connections[n % len(connections)]
            connection.request("POST", "/rate/batch", json.dumps({"requests": batch}),
                               {"content-type": "application/json"})
            response = connection.getresponse()
            response.read()
            if response.status != 200:
                raise RuntimeError(f"/rate/batch answered {response.status}")
        while min(keys_of(api) for _, api, _ in holders) < args.keys:
            if time.monotonic() - began > args.timeout_s:
                raise RuntimeError("the holders did not converge")
            time.sleep(0.2)
        held = keys_of(holders[0][1])
        steady = max(rss_mib(process.pid, "VmRSS") for process, _, _ in holders)
        print(f"{len(holders)} holder(s): {held} keys each after {time.monotonic() - began:.1f} s; "
              f"steady-state RSS (largest holder) {steady:.0f} MiB")
        began = time.monotonic()
        joiner, joiner_api, _ = start(args.binary, "joiner", ",".join(p for _, _, p in holders), logs)
        processes.append(joiner)
        while get(joiner_api, "/ready")[0] != 200:
            if time.monotonic() - began > args.timeout_s:
                raise RuntimeError("the joiner did not turn ready")
            time.sleep(0.02)
        ready = time.monotonic() - began
        known = keys_of(joiner_api)
        # What it knows, as its clients see it: the spend on sampled keys, against a holder's.
        sample = random.Random(12).sample(range(args.keys), min(200, args.keys))
        def remaining(api, i):
            return json.loads(get(api, f"/status?key=client-{i:07}")[1])["bucket"]["remaining"]
        agree = sum(remaining(joiner_api, i) == remaining(holders[0][1], i) for i in sample)
        peak = rss_mib(joiner.pid, "VmHWM")
        nonzero = [line for line in get(joiner_api, "/metrics")[1].decode().splitlines()
                   if re.match(r"openclaw_(peer_\w+_(refused|rejected)|buckets_swept)_total", line)
                   and not line.endswith(" 0")]
        if nonzero:
            print("joiner refused or swept:", "; ".join(nonzero))
        print(f"joiner: ready {ready:.2f} s after start (target <= 10 s), knowing {known} of {held} keys "
              f"({agree} of {len(sample)} sampled keys with the holders' remaining); "
              f"peak RSS {peak:.0f} MiB, {peak / steady:.2f}x the steady state (target <= 2)")
        print(f"logs: {logs}")
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


if __name__ == "__main__":
    main()
