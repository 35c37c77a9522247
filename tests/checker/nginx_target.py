"""Debian's nginx as a check target, on free ports with a generated configuration.

    with Nginx(directory, pki) as nginx:
        nginx.port["http"], nginx.port["sni"], nginx.port["tls1.0"], ...

Servers (one port each unless said):

- `http`: on 127.0.0.1 and [::1]; static files (`/page.html`, `/big.txt` sent gzipped and
  so chunked, `/dir/` with an index), redirects written with `return` under `/r/`, and the
  IDN test name as a virtual host of its own;
- `sni`: https; `sni-a.test` and `sni-b.test` each with its own certificate and body, any
  other name (an IP literal sends no SNI) the `good` certificate and the static files;
- `expired`, `self-signed`, `wrong-name`: https with that certificate;
- `tls1.0`, `tls1.2`, `tls1.3`: https speaking only that version (1.0 with the ciphers
  OpenSSL 3 allows it only at security level 0).

It runs in the foreground (`daemon off`) as a child of the tests and is stopped by its PID.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from types import TracebackType

from checker.pki import IDN_ACE, PKI, SNI_A, SNI_B

from devstack import free_port, wait_for_port

NGINX = shutil.which("nginx") or next(
    (p for p in ("/usr/sbin/nginx", "/sbin/nginx") if os.access(p, os.X_OK)), None
)
PAGE = b"<html><body><h1>hello nginx</h1>" + b"<p>filler</p>" * 150 + b"</body></html>\n"
BIG = b"".join(b"line %06d of a long text sent gzipped\n" % n for n in range(3000))

# OpenSSL 3 speaks TLS 1.0 only at security level 0.
TLS_1_0 = "ssl_protocols TLSv1; ssl_ciphers DEFAULT:@SECLEVEL=0;"
REDIRECTS = """
        location = /r/301 { return 301 /land/nginx-301; }
        location = /r/302 { return 302 /land/nginx-302; }
        location = /r/303 { return 303 /land/nginx-303; }
        location = /r/307 { return 307 /land/nginx-307; }
        location = /r/308 { return 308 /land/nginx-308; }
        location = /r/to-https { return 302 https://localhost:{sni}/page.html; }
        location = /r/to-ipv6 { return 302 http://[::1]:{http}/page.html; }
        location = /r/to-idn { return 302 http://{idn}:{http}/; }
        location /land/ { return 200 "landed $request_method $request_uri\\n"; }
"""


class Nginx:
    def __init__(self, directory: Path, pki: PKI) -> None:
        if NGINX is None:
            raise FileNotFoundError("nginx")
        self._dir = directory
        self._pki = pki
        names = ("http", "sni", "expired", "self-signed", "wrong-name", "tls1.0", "tls1.2")
        self.port = {name: free_port() for name in (*names, "tls1.3")}
        self._process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Nginx:
        www = self._dir / "www"
        (www / "dir").mkdir(parents=True)
        (www / "page.html").write_bytes(PAGE)
        (www / "big.txt").write_bytes(BIG)
        (www / "dir" / "index.html").write_bytes(b"<p>the index of dir</p>\n")
        (self._dir / "tmp").mkdir()
        conf = self._dir / "nginx.conf"
        conf.write_text(self._config(www))
        log = self._dir / "error.log"
        check = subprocess.run(
            [NGINX, "-t", "-p", str(self._dir), "-c", str(conf), "-e", str(log)],
            capture_output=True,
            text=True,
        )
        if check.returncode != 0:
            raise RuntimeError(f"nginx refuses its configuration: {check.stderr}")
        self._process = subprocess.Popen(
            [NGINX, "-p", str(self._dir), "-c", str(conf), "-e", str(log)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for port in self.port.values():
            wait_for_port(port)
        return self

    def __exit__(
        self, _t: type[BaseException] | None, _e: BaseException | None, _tb: TracebackType | None
    ) -> None:
        if self._process is not None:
            self._process.terminate()
            try:
                self._process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()

    def _tls(self, name: str, leaf: str, extra: str = "", body: str | None = None) -> str:
        cert, key = self._pki.leaf(leaf)
        content = f'return 200 "{body}\\n";' if body is not None else "location / { }"
        return f"""
    server {{
        listen 127.0.0.1:{self.port[name]} ssl;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        {extra}
        {content}
    }}"""

    def _config(self, www: Path) -> str:
        tmp = self._dir / "tmp"
        user = "user root root;" if os.geteuid() == 0 else ""
        redirects = (
            REDIRECTS.replace("{sni}", str(self.port["sni"]))
            .replace("{http}", str(self.port["http"]))
            .replace("{idn}", IDN_ACE)
        )
        sni_a_cert, sni_a_key = self._pki.leaf("sni-a")
        sni_b_cert, sni_b_key = self._pki.leaf("sni-b")
        good_cert, good_key = self._pki.leaf("good")
        return f"""
{user}
worker_processes 1;
daemon off;
pid {self._dir}/nginx.pid;
events {{ worker_connections 512; }}
http {{
    access_log off;
    server_tokens off;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    types {{ text/html html; text/plain txt; }}
    default_type text/plain;
    root {www};
    gzip on;
    gzip_types text/plain;
    gzip_min_length 1;
    server {{
        listen 127.0.0.1:{self.port["http"]} default_server;
        listen [::1]:{self.port["http"]} default_server;
        {redirects}
    }}
    server {{
        listen 127.0.0.1:{self.port["http"]};
        listen [::1]:{self.port["http"]};
        server_name {IDN_ACE};
        location / {{ return 200 "the IDN host $host\\n"; }}
    }}
    server {{
        listen 127.0.0.1:{self.port["sni"]} ssl default_server;
        ssl_certificate {good_cert};
        ssl_certificate_key {good_key};
    }}
    server {{
        listen 127.0.0.1:{self.port["sni"]} ssl;
        server_name {SNI_A};
        ssl_certificate {sni_a_cert};
        ssl_certificate_key {sni_a_key};
        return 200 "the site of {SNI_A}\\n";
    }}
    server {{
        listen 127.0.0.1:{self.port["sni"]} ssl;
        server_name {SNI_B};
        ssl_certificate {sni_b_cert};
        ssl_certificate_key {sni_b_key};
        return 200 "the site of {SNI_B}\\n";
    }}
    {self._tls("expired", "expired", body="expired")}
    {self._tls("self-signed", "self-signed", body="self-signed")}
    {self._tls("wrong-name", "wrong-name", body="wrong name")}
    {self._tls("tls1.0", "good", TLS_1_0, "tls 1.0")}
    {self._tls("tls1.2", "good", "ssl_protocols TLSv1.2;", "tls 1.2")}
    {self._tls("tls1.3", "good", "ssl_protocols TLSv1.3;", "tls 1.3")}
}}
"""
