"""Test certificates made with `openssl`: a CA of their own and the leaves a TLS row needs.

    pki = make_pki(directory)
    pki.ca                      # trusted by curl (--cacert) and the probe (SSL_CERT_FILE)
    pki.leaf("good")            # (cert, key) for every test name, signed by the CA

Leaves, all signed by the CA unless said: `good` (localhost, 127.0.0.1, ::1, the IDN test
name), `sni-a` and `sni-b` (one name each, to prove which certificate the server chose),
`expired` (valid only in January 2020), `wrong-name` (wrong.example only) and `self-signed`
(the right names, signed by itself).
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

IDN_HOST = "bücher.test"
IDN_ACE = "xn--bcher-kva.test"
SNI_A, SNI_B = "sni-a.test", "sni-b.test"
GOOD_NAMES = f"DNS:localhost,IP:127.0.0.1,IP:::1,DNS:{IDN_ACE}"

_CA_CONFIG = """\
[ca]
default_ca = test
[test]
database = index.txt
new_certs_dir = .
serial = serial
default_md = sha256
policy = any
copy_extensions = none
[any]
commonName = supplied
"""


@dataclass(frozen=True)
class PKI:
    directory: Path

    @property
    def ca(self) -> Path:
        return self.directory / "ca.pem"

    def leaf(self, name: str) -> tuple[Path, Path]:
        return self.directory / f"{name}.pem", self.directory / f"{name}.key"


def _openssl(directory: Path, *args: str) -> None:
    subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True)


_EC = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")


def _signed(directory: Path, name: str, names: str, *, start: str, end: str) -> None:
    _openssl(directory, "req", *_EC, "-keyout", f"{name}.key", "-out", f"{name}.csr",
             "-subj", f"/CN={name}")  # fmt: skip
    (directory / f"{name}.ext").write_text(
        f"[leaf]\nbasicConstraints = CA:FALSE\nsubjectAltName = {names}\n"
    )
    _openssl(
        directory, "ca", "-batch", "-config", "ca.cnf", "-cert", "ca.pem", "-keyfile", "ca.key",
        "-in", f"{name}.csr", "-out", f"{name}.pem", "-notext", "-extfile", f"{name}.ext",
        "-extensions", "leaf", "-startdate", start, "-enddate", end,
    )  # fmt: skip


def make_pki(directory: Path) -> PKI:
    """A CA and every leaf in `directory` (about a second of openssl)."""
    (directory / "ca.cnf").write_text(_CA_CONFIG)
    (directory / "index.txt").write_text("")
    (directory / "serial").write_text("01\n")
    _openssl(
        directory, "req", "-x509", *_EC, "-keyout", "ca.key", "-out", "ca.pem", "-days", "30",
        "-subj", "/CN=curl agreement test CA",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
    )  # fmt: skip
    # From yesterday, so a clock a little behind does not make them not yet valid.
    start, end = _days_from_now(-1), _days_from_now(30)
    _signed(directory, "good", GOOD_NAMES, start=start, end=end)
    _signed(directory, "sni-a", f"DNS:{SNI_A}", start=start, end=end)
    _signed(directory, "sni-b", f"DNS:{SNI_B}", start=start, end=end)
    _signed(directory, "wrong-name", "DNS:wrong.example", start=start, end=end)
    _signed(directory, "expired", GOOD_NAMES, start="20200101000000Z", end="20200201000000Z")
    _openssl(
        directory, "req", "-x509", *_EC, "-keyout", "self-signed.key", "-out", "self-signed.pem",
        "-days", "30", "-subj", "/CN=localhost", "-addext", f"subjectAltName={GOOD_NAMES}",
    )  # fmt: skip
    return PKI(directory)


def _days_from_now(days: int) -> str:
    return (datetime.now(UTC) + timedelta(days=days)).strftime("%Y%m%d%H%M%SZ")
