#!/usr/bin/env python3
"""A replica joining a peer that holds N spent keys: time to /ready, and the keys it knows then.

    cargo build --release -p openclaw-limiter
    scripts/join-benchmark.py                       # 1 000 000 keys, target/release binary
    scripts/join-benchmark.py --keys 300000 --binary path/to/openclaw-limiter

A benchmark, not a test (not run in CI). Starts two limiter processes on 127.0.0.1 (port 0),
fills the first through /rate/batch (keys spend 3 of 10 tokens refilled over an hour, so none
is full again and forgotten during the run), starts the second with the first as its only peer,
and polls its /ready. Both processes are stopped on exit, failure included; logs go to a
temporary directory that is printed. Figures: docs/benchmarks.md.
"""
import argparse
import http.client
import json
import os
import re
import subprocess
import tempfile
import time

SECRET = "join-benchmark-secret-0123"


def start(binary, name, peers, logs):
    env = dict(
        os.environ,
        OPENCLAW_LISTEN="127.0.0.1:0",
        OPENCLAW_PEER_LISTEN="127.0.0.1:0",
        OPENCLAW_PEERS=peers,
        OPENCLAW_PEER_SECRET=SECRET,
        OPENCLAW_NODE_ID=name,
        OPENCLAW_ANTI_ENTROPY_INTERVAL_MS="600000",
        OPENCLAW_READY_MAX_WAIT_MS="60000",
        REFILL_INTERVAL_MS="3600000",
        RUST_LOG="info",
    )
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


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", type=int, default=1_000_000)
    parser.add_argument("--binary", default="target/release/openclaw-limiter")
    parser.add_argument("--timeout-s", type=float, default=120)
    args = parser.parse_args()
    logs = tempfile.mkdtemp(prefix="join-benchmark-")
    processes = []
    try:
        holder, holder_api, holder_peer = start(args.binary, "holder", "127.0.0.1:9", logs)
        processes.append(holder)
        connection = connect(holder_api)
        began = time.monotonic()
        for first in range(0, args.keys, 1000):
            batch = [{"key": f"client-{i:07}", "cost": 3} for i in range(first, min(args.keys, first + 1000))]
            connection.request("POST", "/rate/batch", json.dumps({"requests": batch}),
                               {"content-type": "application/json"})
            response = connection.getresponse()
            response.read()
            if response.status != 200:
                raise RuntimeError(f"/rate/batch answered {response.status}")
        held = json.loads(get(holder_api, "/status")[1])["keys"]
        print(f"holder: {held} keys spent in {time.monotonic() - began:.1f} s")
        began = time.monotonic()
        joiner, joiner_api, _ = start(args.binary, "joiner", holder_peer, logs)
        processes.append(joiner)
        while get(joiner_api, "/ready")[0] != 200:
            if time.monotonic() - began > args.timeout_s:
                raise RuntimeError("the joiner did not turn ready")
            time.sleep(0.02)
        ready = time.monotonic() - began
        known = json.loads(get(joiner_api, "/status")[1])["keys"]
        with open(f"/proc/{joiner.pid}/status") as status:
            peak = next(int(l.split()[1]) for l in status if l.startswith("VmHWM")) // 1024
        print(f"joiner: ready {ready:.2f} s after start, knowing {known} of {held} keys; peak RSS {peak} MiB")
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
