"""Probe engine: checks per second and CPU per 1,000 checks, side by side in one run.

    .venv/bin/python bench/probe_engine.py [--checks 10000] [--runs 3] [--concurrency 50] [--https]

Targets: one local nginx page of about 1 KB; every check opens a new connection and looks for a
pattern in the body. With `--https` the page is served over TLS 1.3 only, with a certificate
(ECDSA P-256) signed by a CA made for the run, the server's session
cache and tickets off: every check is a new connection with a full handshake, certificate and
host name verified against that CA (the checker trusts it through `SSL_CERT_FILE`, its CA
setting; blackbox_exporter through its module's `tls_config.ca_file`; the bare loops through
an `ssl.create_default_context(cafile=...)`). Contenders, interleaved in each run so they share
the machine's mood:

- `periodic-checker`: the checker's own `Prober` (tracing, RE2, result message encoding) on
  uvloop, the loop the daemon runs on,
- `bare aiohttp`: a plain aiohttp loop with no scheduler, tracing or Kafka: the floor for Python,
  on uvloop (the checker's loop: the headline comparison) and on asyncio's default loop,
- `bare http1`: the checker's own exchange (`periodic_checker/http1.py`) alone, with no Prober
  around it (no phases kept, redirects, result or message), on uvloop: beside bare aiohttp on
  the same loop it is what choosing that exchange over aiohttp's session saves per check,
- `blackbox_exporter`: Prometheus' prober (Debian package), driven through its `/probe`
  endpoint; its CPU is read from its own process, not the driver's,
- with `--https`, `openssl s_time -new -www /` of the OpenSSL the checker's Python is linked
  with: a C loop of one connection, full handshake (certificate verified against the same CA)
  and one GET each, nothing else: the floor of this TLS library on this machine, beside the
  others in the same run (its count is what it did in `--s-time-seconds`).

CPU is each process's own user+system time. Prints the machine (`lscpu` model name, load
average before and after each run) and a Markdown table of medians.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from devstack import free_port, stop_process, wait_for_port

PATTERN = "periodic-checker benchmark page"
PAGE = (
    "<!doctype html><html><head><title>bench</title></head><body><h1>"
    + PATTERN
    + "</h1><p>"
    + "lorem ipsum dolor sit amet " * 34
    + "</p></body></html>\n"
)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


_EC = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")


def make_pki(workdir: Path) -> tuple[Path, Path, Path]:
    """(CA certificate, leaf certificate, leaf key): a CA of the run's own and a leaf for
    127.0.0.1 and localhost that it signed, both ECDSA P-256."""

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=workdir, check=True, capture_output=True)

    openssl("req", "-x509", *_EC, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
            "-subj", "/CN=probe bench CA", "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign")  # fmt: skip
    openssl("req", *_EC, "-keyout", "leaf.key", "-out", "leaf.csr", "-subj", "/CN=localhost")
    (workdir / "leaf.ext").write_text(
        "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n"
        "extendedKeyUsage=serverAuth\nsubjectAltName=DNS:localhost,IP:127.0.0.1\n"
    )
    openssl("x509", "-req", "-in", "leaf.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-days", "2", "-extfile", "leaf.ext", "-out", "leaf.pem")  # fmt: skip
    return workdir / "ca.pem", workdir / "leaf.pem", workdir / "leaf.key"


def tls_server_lines(cert: Path, key: Path) -> str:
    """nginx's TLS settings: TLS 1.3 only, no session cache and no tickets, so no client can
    resume: every connection pays a full handshake."""
    return f"""
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_protocols TLSv1.3;
        ssl_session_cache off;
        ssl_session_tickets off;"""


def start_nginx(
    workdir: Path, port: int, tls: tuple[Path, Path] | None = None, extra: str = ""
) -> subprocess.Popen[bytes]:
    """One nginx worker serving PAGE at `/` on 127.0.0.1:`port` (over TLS with `tls` =
    (cert, key)); `extra` is more of the server block (bench/capacity.py adds a slow page)."""
    www = workdir / "www"
    www.mkdir()
    (www / "index.html").write_text(PAGE)
    conf = workdir / "nginx.conf"
    conf.write_text(
        f"""
daemon off;
worker_processes 1;
pid {workdir}/nginx.pid;
error_log {workdir}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {workdir}/tmp;
    proxy_temp_path {workdir}/tmp;
    fastcgi_temp_path {workdir}/tmp;
    uwsgi_temp_path {workdir}/tmp;
    scgi_temp_path {workdir}/tmp;
    keepalive_timeout 5;
    server {{
        listen 127.0.0.1:{port}{" ssl" if tls else ""} backlog=4096;{tls_server_lines(*tls) if tls else ""}
        root {www};
        location / {{ default_type text/html; }}{extra}
    }}
}}
"""
    )
    (workdir / "tmp").mkdir()
    proc = subprocess.Popen(
        ["nginx", "-c", str(conf), "-p", str(workdir)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_for_port(port)
    return proc


def start_blackbox(workdir: Path, port: int, ca: Path | None = None) -> subprocess.Popen[bytes]:
    """blackbox_exporter with one module, `http_pattern`; with `ca`, it trusts that CA only
    (its default verification: certificate and host name)."""
    tls = f"\n      tls_config:\n        ca_file: {ca}" if ca is not None else ""
    conf = workdir / "blackbox.yml"
    conf.write_text(
        f"""modules:
  http_pattern:
    prober: http
    timeout: 5s
    http:
      method: GET
      fail_if_body_not_matches_regexp: ["{PATTERN}"]
      preferred_ip_protocol: ip4{tls}
"""
    )
    binary = shutil.which("prometheus-blackbox-exporter") or shutil.which("blackbox_exporter")
    if binary is None:
        raise SystemExit(
            "blackbox_exporter not found: apt-get install prometheus-blackbox-exporter"
            " (BENCHMARKS.md, bench-only tools)"
        )
    proc = subprocess.Popen(
        [
            binary,
            f"--config.file={conf}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=error",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_for_port(port)
    return proc


WORKER = r"""
import asyncio, json, sys, time, os, uuid
mode, url, checks, concurrency = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
PATTERN = sys.argv[5]
CA = os.environ.get("BENCH_CA")  # https: the run's CA (the Prober reads it as SSL_CERT_FILE)

def client_tls():
    # The bare loops' context for https: Python's default (verification and host name on).
    import ssl
    return ssl.create_default_context(cafile=CA) if CA and url.startswith("https:") else None
# Set by each contender once set up (imports, sessions, trust store): the figures cover the
# checks only, as a long-running daemon pays its start-up once (blackbox_exporter's too).
mark = {}

def begin():
    mark["cpu"] = time.process_time(); mark["wall"] = time.monotonic()

async def bare():
    import aiohttp, re
    rx = re.compile(PATTERN)
    ok = 0
    tls = client_tls()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True, limit=0)) as s:
        sem = asyncio.Semaphore(concurrency)
        begin()
        async def one():
            nonlocal ok
            async with sem:
                t0 = time.monotonic()
                async with s.get(url, timeout=aiohttp.ClientTimeout(total=5), ssl=tls or True) as r:
                    body = await r.text()
                    if r.status == 200 and rx.search(body):
                        ok += 1
                time.monotonic() - t0
        await asyncio.gather(*(one() for _ in range(checks)))
    return ok

async def ours():
    from periodic_checker.probe import Prober
    from checker_common.task_spec import TaskSpec
    from checker_common.contract import encode
    spec = TaskSpec(name="bench", url=url, pattern=PATTERN, interval=60, timeout=5)
    prober = Prober()
    await prober.start()
    sem = asyncio.Semaphore(concurrency)
    ok = 0
    task_id = uuid.uuid4()
    begin()
    async def one():
        nonlocal ok
        async with sem:
            result = await prober.check(task_id, spec)
            encode(task_id, result)  # the message is part of a check's cost
            ok += result.ok
    await asyncio.gather(*(one() for _ in range(checks)))
    await prober.close()
    return ok

async def http1_only():
    import re
    from aiohttp.resolver import ThreadedResolver
    from yarl import URL
    from periodic_checker import http1
    rx = re.compile(PATTERN)
    target = URL(url)
    resolver = ThreadedResolver()  # unused for an IP literal; the exchange asks for one

    class Marks:
        __slots__ = ("conn_start", "dns_start", "dns_end", "tls_start", "conn_end", "sent")

        def __init__(self):
            self.conn_start = self.dns_start = self.dns_end = None
            self.tls_start = self.conn_end = self.sent = None

    ok = 0
    tls = client_tls()
    sem = asyncio.Semaphore(concurrency)
    begin()
    async def one():
        nonlocal ok
        async with sem:
            head = http1.request_head("GET", target, {}, None, {"Accept": "*/*"})
            response = await http1.exchange(
                "GET", target, head, None, tls=tls, resolver=resolver, marks=Marks()
            )
            try:
                chunks = []
                while chunk := await response.readany():
                    chunks.append(chunk)
                body = b"".join(chunks).decode(response.charset or "utf-8", "replace")
                if response.status == 200 and rx.search(body):
                    ok += 1
            finally:
                response.close()
    await asyncio.gather(*(one() for _ in range(checks)))
    return ok

async def blackbox():
    import aiohttp
    ok = 0
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
        sem = asyncio.Semaphore(concurrency)
        begin()
        async def one():
            nonlocal ok
            async with sem:
                async with s.get(url) as r:
                    text = await r.text()
                    ok += "probe_success 1" in text
        await asyncio.gather(*(one() for _ in range(checks)))
    return ok

fn = {"bare": bare, "ours": ours, "http1": http1_only, "blackbox": blackbox}[mode]
loop_factory = None
if sys.argv[6] == "uvloop":
    import uvloop
    loop_factory = uvloop.new_event_loop
with asyncio.Runner(loop_factory=loop_factory) as runner:
    ok = runner.run(fn())
    cpu, wall = time.process_time() - mark["cpu"], time.monotonic() - mark["wall"]
print(json.dumps({"ok": ok, "wall": wall, "cpu": cpu}))
"""


# Contender -> (worker mode, event loop). The checker daemon runs on uvloop, so our Prober is
# measured there and compared with bare aiohttp on the same loop; bare aiohttp on asyncio's
# loop stays beside it (uvloop alone makes a Python loop faster).
CONTENDERS: dict[str, tuple[str, str]] = {
    "ours": ("ours", "uvloop"),
    "bare-uvloop": ("bare", "uvloop"),
    "bare": ("bare", "asyncio"),
    "bare-http1": ("http1", "uvloop"),
    "blackbox": ("blackbox", "asyncio"),
}

NAMES = {
    "s_time": "`openssl s_time -new -www /` (C, the TLS library's floor)",
    "ours": "periodic-checker Prober",
    "bare-uvloop": "bare aiohttp loop",
    "bare": "bare aiohttp loop",
    "bare-http1": "bare `http1.exchange` loop (no Prober)",
    "blackbox": "blackbox_exporter (/probe)",
}


def cpu_model() -> str:
    """`lscpu`'s model name (what a reader compares machines by)."""
    out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    for line in out.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return "?"


def versions() -> str:
    """blackbox_exporter's and nginx's versions, as their binaries report them."""
    found = []
    for binary in (shutil.which("prometheus-blackbox-exporter") or "blackbox_exporter", "nginx"):
        try:
            out = subprocess.run(
                [binary, "--version" if "blackbox" in binary else "-v"],
                capture_output=True,
                text=True,
                check=False,
            )
        except OSError:
            continue
        found.append((out.stdout + out.stderr).splitlines()[0].strip())
    return "; ".join(found)


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def run_worker(
    mode: str,
    url: str,
    checks: int,
    concurrency: int,
    loop: str = "asyncio",
    ca: Path | None = None,
) -> dict[str, float]:
    env = dict(os.environ)
    if ca is not None:
        env["BENCH_CA"] = str(ca)
        env["SSL_CERT_FILE"] = str(ca)  # the checker's CA setting
    out = subprocess.run(
        [sys.executable, "-c", WORKER, mode, url, str(checks), str(concurrency), PATTERN, loop],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    )
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def run_s_time(port: int, ca: Path, seconds: int) -> dict[str, float]:
    """`openssl s_time`: new connections with a full, verified handshake and one GET each,
    for `seconds`; its CPU (user+system) from the kernel's account of the child."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.monotonic()
    out = subprocess.run(
        ["openssl", "s_time", "-connect", f"127.0.0.1:{port}", "-new", "-www", "/",
         "-CAfile", str(ca), "-verify", "2", "-time", str(seconds)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    wall = time.monotonic() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    found = re.search(r"(\d+) connections in [\d.]+ real seconds", out.stdout)
    if found is None or "verify error" in out.stdout + out.stderr:
        raise RuntimeError(f"openssl s_time: {out.stdout[-500:]} {out.stderr[-500:]}")
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    count = int(found.group(1))
    return {"ok": count, "n": count, "wall": wall, "cpu": cpu}


def ratios(results: dict[str, list[dict[str, float]]], num: str, den: str, key: str) -> list[float]:
    """Per run, `num`'s figure over `den`'s (checks/s for "rate", CPU per check for "cpu"):
    taken within each run, so both saw the same machine."""
    pairs = zip(results[num], results[den], strict=True)
    if key == "rate":
        return [(a["n"] / a["wall"]) / (b["n"] / b["wall"]) for a, b in pairs]
    return [(a["cpu"] / a["n"]) / (b["cpu"] / b["n"]) for a, b in pairs]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--checks", type=int, default=10_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--json", type=Path, help="also write the raw figures here")
    parser.add_argument(
        "--https",
        action="store_true",
        help="TLS 1.3 target, a full handshake and certificate verification per check",
    )
    parser.add_argument("--s-time-seconds", type=int, default=10)
    parser.add_argument(
        "--only", help="comma-separated contenders to run (default all): " + ", ".join(CONTENDERS)
    )
    args = parser.parse_args()
    contenders = args.only.split(",") if args.only else list(CONTENDERS)
    if args.https and not args.only:
        contenders.append("s_time")

    results: dict[str, list[dict[str, float]]] = {name: [] for name in contenders}
    loads: list[str] = []
    print(
        f"CPU {cpu_model()}, nproc {os.cpu_count()}, Python {sys.version.split()[0]}; "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {versions()}",
        file=sys.stderr,
    )
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        work.chmod(0o755)  # nginx workers run as an unprivileged user
        nginx_port, bb_port = free_port(), free_port()
        ca: Path | None = None
        if args.https:
            ca, cert, key = make_pki(work)
            nginx = start_nginx(work, nginx_port, tls=(cert, key))
        else:
            nginx = start_nginx(work, nginx_port)
        try:
            blackbox = start_blackbox(work, bb_port, ca)
        except BaseException:
            stop_process(nginx)  # nothing the bench started outlives it
            raise
        page = f"{'https' if args.https else 'http'}://127.0.0.1:{nginx_port}/"
        probe = f"http://127.0.0.1:{bb_port}/probe?module=http_pattern&target={page}"
        try:
            run_worker("bare", page, 500, args.concurrency, ca=ca)  # warm-up
            for run in range(args.runs):
                before = load_average()
                for mode in contenders:
                    if mode == "s_time":
                        assert ca is not None
                        figures = run_s_time(nginx_port, ca, args.s_time_seconds)
                    elif mode == "blackbox":
                        cpu0 = cpu_seconds(blackbox.pid)
                        figures = run_worker("blackbox", probe, args.checks, args.concurrency)
                        figures["cpu"] = cpu_seconds(blackbox.pid) - cpu0
                    else:
                        worker, loop = CONTENDERS[mode]
                        figures = run_worker(
                            worker, page, args.checks, args.concurrency, loop, ca=ca
                        )
                    figures.setdefault("n", args.checks)
                    results[mode].append(figures)
                    print(f"run {run + 1} {mode}: {figures}", file=sys.stderr)
                loads.append(f"run {run + 1}: {before} -> {load_average()}")
        finally:
            stop_process(blackbox)
            stop_process(nginx)

    summary = {}
    for mode, runs in results.items():
        rate = statistics.median(r["n"] / r["wall"] for r in runs)
        cpu = statistics.median(r["cpu"] / r["n"] * 1000 for r in runs)
        ok = min(r["ok"] / r["n"] * args.checks for r in runs)
        summary[mode] = {"checks_per_s": rate, "cpu_s_per_1000": cpu, "min_ok": ok}
    print(
        f"\n{'HTTPS (TLS 1.3, full handshake, verified)' if args.https else 'HTTP'}: "
        f"{args.checks} checks x {args.runs} runs, concurrency {args.concurrency}, medians; "
        f"CPU {cpu_model()}, nproc {os.cpu_count()}; load average (1, 5, 15 min) before -> "
        f"after each run: {'; '.join(loads)}\n"
    )
    print("| prober | event loop | checks/s | CPU s per 1,000 checks | successful checks (min) |")
    print("|---|---|---|---|---|")
    for mode, row in summary.items():
        loop = {"blackbox": "Go", "s_time": "-"}.get(mode) or CONTENDERS[mode][1]
        print(
            f"| {NAMES[mode]} | {loop} | {row['checks_per_s']:.0f} "
            f"| {row['cpu_s_per_1000']:.3f} | {row['min_ok']:.0f} / {args.checks} |"
        )
    print("\nRatios taken within each run; median (per run):")
    for text, num, den, figure, goal in (
        (
            "Throughput, Prober / bare aiohttp on the same loop (uvloop)",
            "ours",
            "bare-uvloop",
            "rate",
            " (goal >= 0.75)",
        ),
        (
            "Throughput, Prober (uvloop) / bare aiohttp on asyncio's loop",
            "ours",
            "bare",
            "rate",
            "",
        ),
        (
            "CPU per check, Prober / blackbox_exporter",
            "ours",
            "blackbox",
            "cpu",
            " (goal <= 0.60)" if args.https else " (goal <= 0.70)",
        ),
        ("CPU per check, Prober / bare aiohttp on the same loop", "ours", "bare-uvloop", "cpu", ""),
        (
            "CPU per check, the TLS library's floor (openssl s_time) / blackbox_exporter",
            "s_time",
            "blackbox",
            "cpu",
            "",
        ),
        ("CPU per check, Prober / the TLS library's floor", "ours", "s_time", "cpu", ""),
        (
            "CPU per check, bare http1.exchange / bare aiohttp session (both uvloop)",
            "bare-http1",
            "bare-uvloop",
            "cpu",
            "",
        ),
    ):
        if num not in results or den not in results:
            continue
        per_run = ratios(results, num, den, figure)  # not `key`: the TLS key's path above
        print(
            f"- {text}: {statistics.median(per_run):.2f}{goal} "
            f"({', '.join(f'{r:.2f}' for r in per_run)})"
        )
    if args.json:
        args.json.write_text(json.dumps({"runs": results, "summary": summary}, indent=2))
    return 0


if __name__ == "__main__":
    start = time.monotonic()
    code = main()
    print(f"(took {time.monotonic() - start:.0f} s)", file=sys.stderr)
    sys.exit(code)
