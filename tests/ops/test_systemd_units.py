"""The systemd units verify, and the notify protocol speaks real datagrams."""

from __future__ import annotations

import ipaddress
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from checker_common.systemd import Notifier
from periodic_checker.settings import CheckerSettings, parse_networks

ROOT = Path(__file__).resolve().parents[2]
UNITS = sorted((ROOT / "deploy" / "systemd").glob("*.service"))
BIN = Path(sys.executable).parent


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
@pytest.mark.parametrize("unit", UNITS, ids=lambda p: p.name)
def test_unit_passes_systemd_analyze_verify(unit: Path, tmp_path: Path) -> None:
    # verify checks that ExecStart exists: point it at this virtual environment. A template is
    # verified as an instance of it (its %i filled in).
    local = tmp_path / unit.name.replace("@.", "@node-1.")
    local.write_text(unit.read_text().replace("/opt/periodic-checker/bin/", f"{BIN}/"))
    result = subprocess.run(
        ["systemd-analyze", "verify", str(local)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == ""
    text = unit.read_text()
    for required in (
        "Type=notify",
        "WatchdogSec=",
        "Restart=on-failure",
        "RestartPreventExitStatus=2",
        "EnvironmentFile=",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "CapabilityBoundingSet=",
        "RestrictAddressFamilies=",
        "User=periodic-checker",
    ):
        assert required in text


def test_the_checker_unit_denies_the_default_target_networks_in_the_kernel() -> None:
    unit = (ROOT / "deploy" / "systemd" / "periodic-checker.service").read_text()
    denied = [
        network
        for line in unit.splitlines()
        if line.startswith("IPAddressDeny=")
        for network in line.removeprefix("IPAddressDeny=").split()
    ]
    default = CheckerSettings.model_fields["target_deny_networks"].default

    assert {ipaddress.ip_network(n) for n in denied} == set(parse_networks(default))
    assert not [line for line in unit.splitlines() if line.startswith("IPAddressAllow=")]
    for reachable in ("127.0.0.1", "::1"):  # the unit's own API, a local broker
        assert not any(ipaddress.ip_address(reachable) in ipaddress.ip_network(n) for n in denied)


def test_units_exist_for_both_daemons_and_checker_nodes() -> None:
    assert [u.name for u in UNITS] == [
        "checker-processing.service",
        "periodic-checker.service",
        "periodic-checker@.service",
    ]


def directives(unit: Path) -> list[tuple[str, str]]:
    return [
        (key, value)
        for line in unit.read_text().splitlines()
        if "=" in line and not line.startswith("#")
        for key, value in [line.split("=", 1)]
    ]


def test_the_node_template_is_the_checker_unit_with_the_instance_as_the_node() -> None:
    single = directives(ROOT / "deploy" / "systemd" / "periodic-checker.service")
    node = directives(ROOT / "deploy" / "systemd" / "periodic-checker@.service")
    per_node = {
        ("ExecStart", "/opt/periodic-checker/bin/periodic-checker"
         " --env-file /etc/periodic-checker/%i.env run"),
        ("EnvironmentFile", "/etc/periodic-checker/%i.env"),
        ("StateDirectory", "periodic-checker/%i"),
        ("WorkingDirectory", "/var/lib/periodic-checker/%i"),
        ("Environment", "CHECKER_MODE=cluster"),
        ("Environment", "CHECKER_NODE_ID=%i"),
        ("Environment", "TASK_STORAGE=/var/lib/periodic-checker/%i/tasks.sqlite3"),
    }  # fmt: skip

    assert per_node <= set(node)
    # Everything else (watchdog, restart, hardening, the kernel's deny list) as the checker's
    # unit has it; the shared settings file still comes first.
    described = {"Description", "Documentation"}
    assert [d for d in node if d not in per_node and d[0] not in described] == [
        d
        for d in single
        if d[0] not in described
        and d[0] not in {"ExecStart", "StateDirectory", "WorkingDirectory", "Environment"}
    ]
    assert node.index(("EnvironmentFile", "-/etc/periodic-checker/checker.env")) < node.index(
        ("EnvironmentFile", "/etc/periodic-checker/%i.env")
    )


def test_notifier_sends_datagrams_to_notify_socket(tmp_path: Path) -> None:
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(str(path))
        server.settimeout(5)
        notifier = Notifier({"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "2000000"})
        assert notifier.ready("serving")
        assert server.recv(1024) == b"READY=1\nSTATUS=serving"
        assert notifier.watchdog()
        assert server.recv(1024) == b"WATCHDOG=1"
        assert not notifier.watchdog(), "a second ping inside half the interval is skipped"
        assert notifier.stopping()
        assert server.recv(1024) == b"STOPPING=1"
        notifier.close()


def test_notifier_is_a_no_op_outside_systemd() -> None:
    notifier = Notifier({})
    assert not notifier.enabled
    assert not notifier.ready()
    assert not notifier.watchdog()


def test_notifier_never_blocks_when_nobody_reads(tmp_path: Path) -> None:
    path = tmp_path / "full.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(str(path))
        notifier = Notifier({"NOTIFY_SOCKET": str(path)})
        # The receive queue holds only a few datagrams; a blocking send would hang here.
        sent = [notifier.status(f"tick {i}") for i in range(500)]
        assert sent[0] is True
        assert False in sent
        notifier.close()
