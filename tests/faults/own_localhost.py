"""Run `periodic-checker` with `localhost` meaning another loopback address, so that one cluster
node can be cut off from the broker while the others are not.

    python own_localhost.py HOSTS_FILE run

The broker advertises itself as `localhost:PORT`, so every client ends up on that address
whatever it bootstraps from. This entry script enters a mount namespace of its own (root only),
binds HOSTS_FILE over /etc/hosts there (`127.0.0.K localhost`), and runs the checker's command
line in this same process: its PID is the checker's, SIGTERM and SIGKILL reach it directly. The
node's own TLS proxy listens on 127.0.0.K:PORT; stopping it cuts exactly this node.
"""

from __future__ import annotations

import ctypes
import runpy
import subprocess
import sys

CLONE_NEWNS = 0x00020000


def main() -> None:
    hosts = sys.argv[1]
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWNS) != 0:
        errno = ctypes.get_errno()
        sys.exit(f"own_localhost: unshare(CLONE_NEWNS) failed: errno {errno}")
    # Private first, so that the bind below never reaches the host's /etc/hosts.
    subprocess.run(["mount", "--make-rprivate", "/"], check=True)
    subprocess.run(["mount", "--bind", hosts, "/etc/hosts"], check=True)
    sys.argv = ["periodic-checker", *sys.argv[2:]]
    runpy.run_module("periodic_checker.cli", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
