#!/usr/bin/env python3
"""What replication costs a replica under full load: one replica of three against a single node.

    cargo build --release -p openclaw-limiter
    scripts/bench-replication.py                    # 100k keys, 4 rounds of 8 s
    scripts/bench-replication.py --keys 1000000 --rounds 6 --binary path/to/openclaw-limiter
    scripts/bench-replication.py --baseline path/to/older/openclaw-limiter --rounds 8 --seconds 4

Issue 12's target: the throughput of one replica of 3 (all replicating) is at least 90 % of a
single node's, in the same run; bytes per decision reported.

A benchmark, not a test (not run in CI). Side by side, alternating rounds: a single limiter
(no peers), and a cluster of three that replicate to each other (peers file, default sync and
anti-entropy intervals). The measured process (the single node, or the cluster's first
replica) is pinned alone to --server-cpu; wrk (Debian's `wrk`, closed loop, 64 connections,
`GET /rate` over --keys keys drawn uniformly, as scripts/bench-http.sh does) and the cluster's
other two replicas share --load-cpu. Each round reports requests per second, the measured
process's CPU time per decision (from /proc: what the ratio means if its core is not saturated)
and, for the cluster, the bytes it sent to its peers per decision. With --baseline, a second cluster
of three runs that binary, its first replica measured in the same rounds on the same cores, and
each round also gives new against baseline: how a change to replication moves its cost, with the
machine's drift cancelled round by round. Every process is stopped on exit, failure included.
Figures: docs/benchmarks.md.
"""
import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

SECRET = "replication-benchmark-secret-0123"
CLK_TCK = os.sysconf("SC_CLK_TCK")

KEYS_LUA = """
local pool = {}
local n = 0
function init(args)
  local keys = tonumber(args[1]) or 100000
  for i = 1, math.min(keys, 65536) do
    pool[i] = wrk.format("GET", string.format("/rate?key=client-%07d&policy=default&cost=1", math.random(keys) - 1))
  end
end
function request()
  n = n + 1
  if n > #pool then n = 1 end
  return pool[n]
end
"""


class Limiter:
    def __init__(self, binary, name, cpu, workdir, peers_file=None):
        env = dict(os.environ, OPENCLAW_LISTEN="127.0.0.1:0", OPENCLAW_PEER_LISTEN="127.0.0.1:0",
                   OPENCLAW_NODE_ID=name, BUCKET_CAPACITY="1000000000",
                   REFILL_INTERVAL_MS="1000", RUST_LOG="warn")
        if peers_file:
            env.update(OPENCLAW_PEERS_FILE=peers_file, OPENCLAW_PEER_SECRET=SECRET)
        self.log = open(os.path.join(workdir, f"{name}.log"), "w")
        self.process = subprocess.Popen(["taskset", "-c", str(cpu), binary], env=env,
                                        stdout=subprocess.PIPE, stderr=self.log, text=True)
        self.api = self.peer = None
        for line in self.process.stdout:
            if m := re.search(r"listening api=http://(\S+)", line):
                self.api = m.group(1)
            if m := re.search(r"listening peer=http://(\S+)", line):
                self.peer = m.group(1)
            if self.api and (self.peer or not peers_file):
                break
        if not self.api:
            raise RuntimeError(f"{name} exited before listening (see {self.log.name})")

    def cpu_ticks(self):
        with open(f"/proc/{self.process.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])

    def metric(self, series):
        with urllib.request.urlopen(f"http://{self.api}/metrics", timeout=10) as r:
            for line in r.read().decode().splitlines():
                if line.startswith(series + " "):
                    return float(line.rsplit(" ", 1)[1])
        return 0.0

    def stop(self):
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=35)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def wrk(api, seconds, keys, cpu, script):
    out = subprocess.run(
        ["taskset", "-c", str(cpu), "wrk", "-t1", "-c64", f"-d{seconds}s", "-s", script,
         f"http://{api}", "--", str(keys)],
        capture_output=True, text=True, check=True).stdout
    total = int(re.search(r"(\d+) requests in", out).group(1))
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return total / seconds, total, int(errors.group(1)) if errors else 0


def wait_for(what, condition, seconds=30):
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            sys.exit(f"timed out waiting for {what}")
        time.sleep(0.1)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--binary", default=os.path.join(
        os.environ.get("CARGO_TARGET_DIR", "target"), "release", "openclaw-limiter"))
    parser.add_argument("--keys", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--server-cpu", type=int, default=0)
    parser.add_argument("--load-cpu", type=int, default=1)
    parser.add_argument("--baseline", help="another build of openclaw-limiter: a second cluster "
                        "of three runs it, measured in the same rounds")
    args = parser.parse_args()
    if not shutil.which("wrk"):
        sys.exit("wrk is missing (apt-get install wrk)")
    for binary in filter(None, (args.binary, args.baseline)):
        if not os.access(binary, os.X_OK):
            sys.exit(f"{binary}: build it first (cargo build --release -p openclaw-limiter)")

    workdir = tempfile.mkdtemp(prefix="bench-replication-")
    script = os.path.join(workdir, "keys.lua")
    with open(script, "w") as f:
        f.write(KEYS_LUA)
    started = []

    def start_cluster(binary, prefix):
        """Three replicas of `binary` that replicate to each other; the first is measured."""
        peers_file = os.path.join(workdir, f"{prefix}peers")
        open(peers_file, "w").close()
        cluster = []
        for i in range(3):
            cpu = args.server_cpu if i == 0 else args.load_cpu
            cluster.append(Limiter(binary, f"{prefix}replica-{i}", cpu, workdir, peers_file))
            started.append(cluster[-1])
        with open(peers_file + ".new", "w") as f:
            f.write("".join(f"{r.peer}\n" for r in cluster))
        os.replace(peers_file + ".new", peers_file)
        wait_for("the replicas to see each other", lambda: all(
            r.metric('openclaw_peers{state="up"}') == 2 for r in cluster))
        return cluster[0]

    try:
        single = Limiter(args.binary, "single", args.server_cpu, workdir)
        started.append(single)
        measured = start_cluster(args.binary, "")
        subjects = [("single", single), ("cluster", measured)]
        if args.baseline:
            subjects.append(("baseline", start_cluster(args.baseline, "baseline-")))
        sent = 'openclaw_replication_bytes_total{direction="sent"}'
        allowed = 'openclaw_requests_total{policy="default",decision="allowed"}'
        for _, subject in subjects:
            wrk(subject.api, args.warmup, args.keys, args.load_cpu, script)
        rows = []
        for round_ in range(1, args.rounds + 1):
            row = {}
            # Each round starts with the next subject, so that none is always measured first
            # (the machine's speed drifts within a round too).
            shift = (round_ - 1) % len(subjects)
            for name, subject in subjects[shift:] + subjects[:shift]:
                ticks, bytes_, decided = subject.cpu_ticks(), subject.metric(sent), subject.metric(allowed)
                rps, total, errors = wrk(subject.api, args.seconds, args.keys, args.load_cpu, script)
                ticks = subject.cpu_ticks() - ticks
                decided = subject.metric(allowed) - decided
                if errors or decided < total:
                    sys.exit(f"{name}: {errors} errors, {decided:.0f} allowed of {total} answers")
                row[name] = dict(
                    rps=rps, busy=100 * ticks / CLK_TCK / args.seconds,
                    cpu_us=1e6 * ticks / CLK_TCK / total,
                    bytes=(subject.metric(sent) - bytes_) / total)
                print(f"round {round_}: {name:8}: {rps:8.0f} req/s, its core "
                      f"{row[name]['busy']:3.0f}% busy, {row[name]['cpu_us']:.1f} us CPU a decision"
                      + (f", {row[name]['bytes']:.1f} bytes sent to peers a decision"
                         if name != "single" else ""), flush=True)
            rows.append(row)
        ratios = [r["cluster"]["rps"] / r["single"]["rps"] for r in rows]
        cpu_ratios = [r["single"]["cpu_us"] / r["cluster"]["cpu_us"] for r in rows]
        print(f"single node:          best {max(r['single']['rps'] for r in rows):8.0f} req/s")
        print(f"one replica of three: best {max(r['cluster']['rps'] for r in rows):8.0f} req/s")
        print(f"ratio, req/s:          round by round {' '.join(f'{x:.2f}' for x in ratios)}; "
              f"median {statistics.median(ratios):.2f} (target >= 0.90)")
        print(f"ratio, CPU a decision: round by round {' '.join(f'{x:.2f}' for x in cpu_ratios)}; "
              f"median {statistics.median(cpu_ratios):.2f}")
        print(f"bytes sent to peers per decision (two peers): median "
              f"{statistics.median(r['cluster']['bytes'] for r in rows):.1f}")
        if args.baseline:
            versus = [r["cluster"]["rps"] / r["baseline"]["rps"] for r in rows]
            cpu_versus = [r["baseline"]["cpu_us"] / r["cluster"]["cpu_us"] for r in rows]
            print(f"replica, new / baseline, req/s:        round by round "
                  f"{' '.join(f'{x:.2f}' for x in versus)}; median {statistics.median(versus):.2f}")
            print(f"replica, new / baseline, CPU a decision: round by round "
                  f"{' '.join(f'{x:.2f}' for x in cpu_versus)}; "
                  f"median {statistics.median(cpu_versus):.2f} (above 1: the new build is cheaper)")
        print(f"load average: {open('/proc/loadavg').read().split()[:3]} (other work skews the figures)")
    finally:
        for limiter in started:
            limiter.stop()


if __name__ == "__main__":
    main()
