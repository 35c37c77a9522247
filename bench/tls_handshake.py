"""CPU per full TLS 1.3 handshake alone, by client set-up: where an https check's CPU can go.

    .venv/bin/python bench/tls_handshake.py [--handshakes 3000] [--runs 3]

The same local nginx as `bench/probe_engine.py --https` (TLS 1.3 only, ECDSA P-256 certificate
from a CA of the run's own, session cache and tickets off). Each client opens a connection,
completes the handshake with the certificate and host name verified, and closes it: no HTTP.
Clients, interleaved in every run:

- `openssl s_time -new`: OpenSSL's own C loop (the floor of the library Python is linked with),
- Python's `ssl` on blocking sockets: the binding without an event loop; also with X25519 as
  the only key exchange group, and with verification off (what verification costs),
- Python's `ssl` through asyncio's default loop (`sslproto`, Python) and through uvloop (the
  checker's loop, its TLS protocol in Cython), 50 handshakes at once,
- the checker's own context (`probe.tls_contexts()`, trust store from SSL_CERT_FILE) on uvloop.
- another binding over another OpenSSL: pyOpenSSL on blocking sockets, over the OpenSSL the
  `cryptography` wheel bundles (newer than the system's; `pip install -e '.[bench]'`).

CPU is each client process's own user+system time over its handshakes.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.probe_engine import cpu_model, load_average, make_pki, start_nginx  # noqa: E402
from devstack import free_port, stop_process  # noqa: E402

CLIENT = r"""
import asyncio, json, socket, ssl, sys, time
port, ca, variant, count = int(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])
host = "127.0.0.1"

def context():
    if variant == "checker-uvloop":
        from periodic_checker.probe import tls_contexts
        return tls_contexts()[0]
    c = ssl.create_default_context(cafile=ca)
    if variant == "blocking-x25519":
        c.set_ecdh_curve("X25519")
    if variant == "blocking-unverified":
        c.check_hostname = False
        c.verify_mode = ssl.CERT_NONE
    return c

def pyopenssl():
    # Another binding: pyOpenSSL over the OpenSSL that the `cryptography` wheel bundles (its own
    # release, newer than the system's). Verified as the others: the chain, and the address
    # the certificate names (set where OpenSSL checks it, as Python's ssl module does).
    from OpenSSL import SSL
    from OpenSSL._util import lib
    c = SSL.Context(SSL.TLS_CLIENT_METHOD)
    c.load_verify_locations(ca)
    c.set_verify(SSL.VERIFY_PEER, None)
    address = socket.inet_aton(host)
    for _ in range(count):
        with socket.create_connection((host, port)) as raw:
            conn = SSL.Connection(c, raw)
            if lib.X509_VERIFY_PARAM_set1_ip(lib.SSL_get0_param(conn._ssl), address, 4) != 1:
                raise RuntimeError("X509_VERIFY_PARAM_set1_ip")
            conn.set_connect_state()
            conn.do_handshake()

def blocking(c):
    for _ in range(count):
        with socket.create_connection((host, port)) as raw:
            c.wrap_socket(raw, server_hostname=host).close()

async def looped(c):
    loop = asyncio.get_running_loop()
    at_once = asyncio.Semaphore(50)
    async def one():
        async with at_once:
            transport, _ = await loop.create_connection(
                asyncio.Protocol, host, port, ssl=c, server_hostname=host
            )
            transport.close()
    await asyncio.gather(*(one() for _ in range(count)))

began = time.process_time()
if variant == "pyopenssl":
    pyopenssl()
    print(json.dumps({"cpu": time.process_time() - began, "n": count}))
    sys.exit()
c = context()
began = time.process_time()
if variant.startswith("blocking"):
    blocking(c)
else:
    factory = None
    if variant.endswith("uvloop"):
        import uvloop
        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(looped(c))
print(json.dumps({"cpu": time.process_time() - began, "n": count}))
"""

VARIANTS = {
    "s_time": "`openssl s_time -new` (C)",
    "blocking": "Python `ssl`, blocking sockets",
    "blocking-x25519": "Python `ssl`, blocking, X25519 the only group",
    "blocking-unverified": "Python `ssl`, blocking, verification off (reference only)",
    "asyncio": "Python `ssl` through asyncio's loop (sslproto)",
    "uvloop": "Python `ssl` through uvloop",
    "checker-uvloop": "the checker's context (`probe.tls_contexts()`) through uvloop",
    "pyopenssl": "pyOpenSSL, blocking, over the OpenSSL bundled with `cryptography`",
}


def s_time(port: int, ca: Path, seconds: int) -> dict[str, float]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run(
        ["openssl", "s_time", "-connect", f"127.0.0.1:{port}", "-new", "-CAfile", str(ca),
         "-verify", "2", "-time", str(seconds)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    found = re.search(r"(\d+) connections in [\d.]+ real seconds", out.stdout)
    if found is None or "verify error" in out.stdout:
        raise RuntimeError(out.stdout[-500:])
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    return {"cpu": cpu, "n": int(found.group(1))}


def client(port: int, ca: Path, variant: str, count: int) -> dict[str, float]:
    env = {**os.environ, "SSL_CERT_FILE": str(ca), "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-c", CLIENT, str(port), str(ca), variant, str(count)],
        capture_output=True, text=True, check=True, env=env,
    )  # fmt: skip
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--handshakes", type=int, default=3000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--s-time-seconds", type=int, default=5)
    args = parser.parse_args()
    print(
        f"CPU {cpu_model()}, nproc {os.cpu_count()}, Python {sys.version.split()[0]}; "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        file=sys.stderr,
    )
    per_run: dict[str, list[float]] = {name: [] for name in VARIANTS}
    loads = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        work.chmod(0o755)  # nginx workers run as an unprivileged user
        ca, cert, key = make_pki(work)
        port = free_port()
        nginx = start_nginx(work, port, tls=(cert, key))
        try:
            for run in range(args.runs):
                before = load_average()
                for name in VARIANTS:
                    if name == "s_time":
                        figures = s_time(port, ca, args.s_time_seconds)
                    else:
                        figures = client(port, ca, name, args.handshakes)
                    per_run[name].append(figures["cpu"] / figures["n"] * 1000)
                    print(f"run {run + 1} {name}: {per_run[name][-1]:.3f} ms", file=sys.stderr)
                loads.append(f"run {run + 1}: {before} -> {load_average()}")
        finally:
            stop_process(nginx)
    print(
        f"\nFull TLS 1.3 handshakes (ECDSA P-256, verified), {args.handshakes} per Python client "
        f"and run, {args.runs} runs, medians; CPU {cpu_model()}, nproc {os.cpu_count()}; "
        f"load average before -> after each run: {'; '.join(loads)}\n"
    )
    print("| client | CPU ms per handshake | per run |")
    print("|---|---|---|")
    for name, label in VARIANTS.items():
        values = per_run[name]
        print(
            f"| {label} | {statistics.median(values):.3f} "
            f"| {', '.join(f'{v:.3f}' for v in values)} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
