"""Capacity per core: the real checker daemon at a steady rate of checks, six ways.

    .venv/bin/python bench/capacity.py --rate 500 --runs 3

What a user sizes a checker with: CPU seconds per check inside the daemon (so checks a second
per core = 1 / that) and the schedule lag p99 at that rate, for

- HTTP, a new connection per check (the default for a task),
- HTTPS, a new connection per check: TCP + a full TLS 1.3 handshake with certificate and host
  name verified (the server's session cache and tickets are off, so nothing is resumed),
- HTTPS keep-alive (`keepalive: true`): connections pooled and reused between checks,

each against a target answering at once (an nginx page of about 1 KB) and one answering after
`--delay-ms` (200 ms: nginx in front of a small server that waits before answering, so
rate x delay checks are in flight at once).

Every run is `bench/scheduler_scale.py`'s: a fresh topic on the local broker behind mutual TLS,
`rate x interval` tasks written into a new store, the daemon started (uvloop, default settings
but PER_HOST_IN_FLIGHT=500, as every task targets one host), its results read from the topic
over a window of `--intervals` whole intervals; CPU is the daemon's own user+system time over
the window. The six configurations are interleaved in every run so they share the machine's
mood; medians of the runs. The CA of the run is trusted through `SSL_CERT_FILE`, the daemon's
CA setting.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import kafka, workdir  # noqa: E402
from bench.probe_engine import PAGE, cpu_model, load_average, make_pki, start_nginx  # noqa: E402
from bench.scheduler_scale import RunResult, one_run  # noqa: E402
from devstack import free_port, stop_process, wait_for_port  # noqa: E402

PYTHON = ROOT / ".venv" / "bin" / "python"

# The slow target's answer: the page after `delay` seconds, then the connection closes
# (nginx, in front, speaks HTTP/1.0 to it and keeps its own connections to the checker).
SLOW_SERVER = r"""
import asyncio, sys
import uvloop
port, delay, page = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3].encode()
answer = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nConnection: close\r\n"
    b"Content-Length: " + str(len(page)).encode() + b"\r\n\r\n" + page
)

class Slow(asyncio.Protocol):
    def connection_made(self, transport):
        self.transport, self.head, self.asked = transport, b"", False

    def data_received(self, data):
        self.head += data
        if not self.asked and b"\r\n\r\n" in self.head:
            self.asked = True
            asyncio.get_running_loop().call_later(delay, self.answer)

    def answer(self):
        if not self.transport.is_closing():
            self.transport.write(answer)
            self.transport.close()

async def main():
    server = await asyncio.get_running_loop().create_server(
        Slow, "127.0.0.1", port, backlog=4096
    )
    await server.serve_forever()

uvloop.run(main())
"""

# (label, scheme, keep-alive)
KINDS: list[tuple[str, str, bool]] = [
    ("HTTP, new connection", "http", False),
    ("HTTPS, new connection (full handshake, verified)", "https", False),
    ("HTTPS keep-alive", "https", True),
]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rate", type=int, default=500, help="checks a second offered")
    parser.add_argument("--interval", type=float, default=10.0)
    parser.add_argument("--intervals", type=int, default=2)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--delay-ms", type=int, default=200, help="the slow target's wait")
    args = parser.parse_args()
    tasks = int(args.rate * args.interval)
    print(
        f"CPU {cpu_model()}, nproc {os.cpu_count()}, Python {sys.version.split()[0]}; "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; load average {load_average()}",
        file=sys.stderr,
    )
    configs = [
        (label, scheme, keepalive, path)
        for path in ("/", "/slow")
        for label, scheme, keepalive in KINDS
    ]
    results: dict[int, list[RunResult]] = {n: [] for n in range(len(configs))}
    with workdir() as work, kafka(work) as kafka_:
        work.chmod(0o755)  # nginx workers run as an unprivileged user
        pki_dir = work / "pki"
        pki_dir.mkdir()
        ca, cert, key = make_pki(pki_dir)
        slow_port, http_port, https_port = free_port(), free_port(), free_port()
        slow = subprocess.Popen(
            [str(PYTHON), "-c", SLOW_SERVER, str(slow_port), str(args.delay_ms / 1000), PAGE],
            stdout=subprocess.DEVNULL,
        )
        servers = [slow]
        try:
            wait_for_port(slow_port)
            extra = f"\n        location = /slow {{ proxy_pass http://127.0.0.1:{slow_port}/; }}"
            for name, port, tls in (
                ("nginx-http", http_port, None),
                ("nginx-https", https_port, (cert, key)),
            ):
                (work / name).mkdir()
                (work / name).chmod(0o755)
                servers.append(start_nginx(work / name, port, tls=tls, extra=extra))
            env = {"SSL_CERT_FILE": str(ca)}
            for run in range(args.runs):
                for n, (label, scheme, keepalive, path) in enumerate(configs):
                    port = https_port if scheme == "https" else http_port
                    url = f"{scheme}://127.0.0.1:{port}{path}"
                    print(f"run {run + 1}/{args.runs}: {label}, {url}", file=sys.stderr)
                    result = one_run(
                        kafka_,
                        url,
                        tasks,
                        args.interval,
                        args.intervals,
                        keepalive=keepalive,
                        extra_env=env,
                    )
                    results[n].append(result)
                    print(f"  {line(result)}", file=sys.stderr)
                    print(f"  /status: {json.dumps(result.daemon_status)}", file=sys.stderr)
        finally:
            for server in reversed(servers):
                stop_process(server)
    print(
        f"\n{tasks:,} tasks every {args.interval:g} s ({args.rate} checks/s offered), "
        f"{args.intervals} intervals measured per run, {args.runs} runs, medians; "
        f"CPU {cpu_model()}, nproc {os.cpu_count()}\n"
    )
    print(
        "| target | checks | CPU ms per check | checks/s per core | lag p50 / p99 "
        "| missed / failed (all runs) | daemon CPU (cores) | load average (run means) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for n, (label, _scheme, _keepalive, path) in enumerate(configs):
        runs = results[n]
        per_check = statistics.median(r.cpu_s / max(1, r.received) * 1000 for r in runs)
        target = "0 ms (nginx page)" if path == "/" else f"{args.delay_ms} ms"
        print(
            f"| {target} | {label} | {per_check:.3f} | {1000 / per_check:,.0f} "
            f"| {statistics.median(r.lag_p50 for r in runs) * 1000:.1f} / "
            f"{statistics.median(r.lag_p99 for r in runs) * 1000:.1f} ms "
            f"| {sum(r.missed for r in runs)} / {sum(r.failed for r in runs)} "
            f"| {statistics.median(r.cpu_s / r.window_s for r in runs):.2f} "
            f"| {', '.join(f'{r.load_avg[1]:.1f}' for r in runs)} |"
        )
    return 0


def line(r: RunResult) -> str:
    return (
        f"received {r.received}/{r.expected}, failed {r.failed}, lag p50/p99 "
        f"{r.lag_p50 * 1000:.1f}/{r.lag_p99 * 1000:.1f} ms, "
        f"CPU {r.cpu_s / max(1, r.received) * 1000:.3f} ms per check "
        f"({r.cpu_s / r.window_s:.2f} cores), load {r.load_avg[1]:.1f}"
    )


if __name__ == "__main__":
    sys.exit(main())
