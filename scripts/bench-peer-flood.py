#!/usr/bin/env python3
"""Unauthenticated uploads flooding a replica's peer port: its memory, and /rate's latency meanwhile.

    cargo build --release -p openclaw-limiter
    scripts/bench-peer-flood.py                      # 200 connections, 16 MiB each, 15 s
    scripts/bench-peer-flood.py --connections 50 --seconds 5 --binary path/to/openclaw-limiter

Issue 12's target: 200 concurrent unauthenticated 16 MiB uploads to the peer port; the
replica's RSS grows by less than 64 MiB and `/rate` keeps answering with p99 < 5 ms.

A benchmark, not a test (not run in CI; the bound itself is tested in limiter/tests/replication.rs,
`unauthenticated_bodies_are_held_within_one_budget_across_connections`). One limiter on
127.0.0.1 (port 0) with a peer listener, pinned to --server-cpu. Each attacking connection
sends `POST /v1/sync` with a fresh timestamp, a well-formed but wrong signature and
`Content-Length: 16777216`, then writes the body as fast as the replica reads it; when the
replica answers or closes, it connects again, until the time is up (so 200 uploads are in flight
all along). Meanwhile wrk (closed loop, 8 connections, Debian's `wrk`) measures `GET /rate` on
the same replica and its RSS is sampled every 50 ms from /proc. The attackers and wrk run on
--load-cpu. Everything is stopped on exit, failure included.

Prints: RSS before, peak and growth; /rate's p50/p99 before the flood and during it; the bytes
the attackers got written; the replica's refusals by reason.
"""
import argparse
import asyncio
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

SECRET = "peer-flood-benchmark-secret-0123"
BODY = 16 * 1024 * 1024


def rss_bytes(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def metrics(api):
    with urllib.request.urlopen(f"http://{api}/metrics", timeout=10) as r:
        return r.read().decode()


def wrk_latency(api, seconds, cpu):
    """p50 and p99 of GET /rate in ms, and requests per second, from wrk --latency."""
    out = subprocess.run(
        ["taskset", "-c", str(cpu), "wrk", "-t1", "-c8", f"-d{seconds}s", "--latency",
         f"http://{api}/rate?key=flood-witness&cost=1"],
        capture_output=True, text=True, check=True).stdout

    def ms(label):
        m = re.search(rf"^\s+{label}\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        value, unit = float(m.group(1)), m.group(2)
        return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value

    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return ms("50%"), ms("99%"), rps, int(errors.group(1)) if errors else 0


async def attacker(host, port, deadline, sent):
    chunk = b"\0" * (256 * 1024)
    while time.monotonic() < deadline:
        try:
            reader, writer = await asyncio.open_connection(host, port)
        except OSError:
            await asyncio.sleep(0.01)
            continue
        head = (
            f"POST /v1/sync HTTP/1.1\r\nhost: {host}\r\ncontent-type: application/json\r\n"
            f"content-length: {BODY}\r\nx-openclaw-timestamp: {int(time.time() * 1e6)}\r\n"
            f"x-openclaw-signature: {secrets.token_hex(32)}\r\n\r\n"
        ).encode()
        try:
            writer.write(head)
            left = BODY
            while left > 0 and time.monotonic() < deadline:
                if reader.at_eof():
                    break
                n = min(left, len(chunk))
                writer.write(chunk[:n])
                await asyncio.wait_for(writer.drain(), timeout=max(0.01, deadline - time.monotonic()))
                left -= n
                sent[0] += n
            # Whatever the replica answers (401 once the body is in, 503 over the budget).
            if time.monotonic() < deadline:
                await asyncio.wait_for(reader.read(4096), timeout=max(0.01, deadline - time.monotonic()))
        except (OSError, asyncio.TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()
            try:
                await writer.wait_closed()
            except (OSError, ConnectionError):
                pass


def flood(peer, connections, seconds, cpu, sent):
    os.sched_setaffinity(0, {cpu})
    host, port = peer.rsplit(":", 1)
    deadline = time.monotonic() + seconds

    async def main():
        await asyncio.gather(*(attacker(host, int(port), deadline, sent) for _ in range(connections)))

    asyncio.run(main())


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--binary", default=os.path.join(
        os.environ.get("CARGO_TARGET_DIR", "target"), "release", "openclaw-limiter"))
    parser.add_argument("--connections", type=int, default=200)
    parser.add_argument("--seconds", type=int, default=15)
    parser.add_argument("--server-cpu", type=int, default=0)
    parser.add_argument("--load-cpu", type=int, default=1)
    args = parser.parse_args()
    if not shutil.which("wrk"):
        sys.exit("wrk is missing (apt-get install wrk)")
    if not os.access(args.binary, os.X_OK):
        sys.exit(f"{args.binary}: build it first (cargo build --release -p openclaw-limiter)")

    logs = tempfile.mkdtemp(prefix="peer-flood-")
    peers_file = os.path.join(logs, "peers")
    open(peers_file, "w").close()
    # Every attacker connects from 127.0.0.1: the per-source cap (64) would hold all but 64 of
    # them off, and this measures the body budget across all of them, so it is lifted to the
    # total (as if they came from as many addresses).
    env = dict(os.environ, OPENCLAW_LISTEN="127.0.0.1:0", OPENCLAW_PEER_LISTEN="127.0.0.1:0",
               OPENCLAW_GRPC_LISTEN="127.0.0.1:0", OPENCLAW_PEERS_FILE=peers_file,
               OPENCLAW_PEER_SECRET=SECRET, OPENCLAW_NODE_ID="flooded",
               OPENCLAW_PEER_MAX_CONNECTIONS_PER_SOURCE="1024",
               BUCKET_CAPACITY="1000000000", REFILL_INTERVAL_MS="1000", RUST_LOG="warn")
    log = open(os.path.join(logs, "limiter.log"), "w")
    process = subprocess.Popen(["taskset", "-c", str(args.server_cpu), args.binary], env=env,
                               stdout=subprocess.PIPE, stderr=log, text=True)
    try:
        api = peer = None
        for line in process.stdout:
            if m := re.search(r"listening api=http://(\S+)", line):
                api = m.group(1)
            if m := re.search(r"listening peer=http://(\S+)", line):
                peer = m.group(1)
            if api and peer:
                break
        if not (api and peer):
            sys.exit(f"the limiter exited before listening (see {log.name})")
        for _ in range(100):
            try:
                urllib.request.urlopen(f"http://{api}/ready", timeout=1)
                break
            except OSError:
                time.sleep(0.1)
        quiet = wrk_latency(api, 5, args.load_cpu)
        before = rss_bytes(process.pid)
        peak = [before]
        stop = threading.Event()

        def sample():
            while not stop.is_set():
                peak[0] = max(peak[0], rss_bytes(process.pid))
                time.sleep(0.05)

        sampler = threading.Thread(target=sample)
        sampler.start()
        sent = [0]
        attackers = threading.Thread(
            target=flood, args=(peer, args.connections, args.seconds, args.load_cpu, sent))
        attackers.start()
        # /rate is measured once the flood holds the budget (64 MiB written), at most 5 s on.
        ramp = time.monotonic() + 5
        while sent[0] < 64 * 1024 * 1024 and time.monotonic() < ramp:
            time.sleep(0.05)
        during = wrk_latency(api, max(1, args.seconds - 4), args.load_cpu)
        attackers.join()
        stop.set()
        sampler.join()
        after = rss_bytes(process.pid)
        if process.poll() is not None:
            sys.exit(f"the limiter died during the flood (see {log.name})")
        text = metrics(api)
        refusals = {m.group(1): float(m.group(2)) for m in re.finditer(
            r'^openclaw_peer_messages_rejected_total\{reason="(\w+)"\} (\S+)$', text, re.M)}
        mib = 1024 * 1024
        print(f"attackers: {args.connections} connections for {args.seconds} s, "
              f"{sent[0] / mib:.0f} MiB of bodies written")
        print(f"RSS: {before / mib:.1f} MiB before, peak {peak[0] / mib:.1f} MiB, "
              f"{after / mib:.1f} MiB after; growth {(peak[0] - before) / mib:.1f} MiB "
              f"(target < 64 MiB)")
        print(f"/rate before the flood: p50 {quiet[0]:.2f} ms, p99 {quiet[1]:.2f} ms, "
              f"{quiet[2]:.0f} req/s, {quiet[3]} not 2xx")
        print(f"/rate during the flood: p50 {during[0]:.2f} ms, p99 {during[1]:.2f} ms "
              f"(target < 5 ms), {during[2]:.0f} req/s, {during[3]} not 2xx")
        print("refusals: " + ", ".join(f"{k} {v:.0f}" for k, v in sorted(refusals.items()) if v))
        print(f"logs: {logs}")
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


if __name__ == "__main__":
    main()
