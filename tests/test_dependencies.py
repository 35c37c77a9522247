"""Every third-party import is a declared dependency with a floor; the lock agrees with setup.cfg.

The installed packages may import only `install_requires`; the local broker harness, the tests
and the scripts may also use the dev extra, the benchmarks also the bench extra. Floors are
tried for real by scripts/test-floors.sh; the lock (constraints.txt) by every other run.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterable
from importlib.metadata import packages_distributions
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
# bench/ too: a test may import a benchmark's pure counting (tests/test_bench_cadence.py).
FIRST_PARTY = {"checker_common", "periodic_checker", "checker_processing", "devstack", "bench"}
INSTALLED = ["checker_common", "periodic_checker", "checker_processing"]
# Standard library in a later Python, imported only there (decoding.py: compression.zstd, 3.14).
LATER_STDLIB = {"compression"}


def setup_cfg_requirements() -> dict[str, list[Requirement]]:
    sys.path.insert(0, str(ROOT / "scripts"))
    from floors import declared

    return declared()


def local_names(folders: Iterable[Path]) -> set[str]:
    """Modules imported by their bare name from beside the importer (conftest, helpers, ...)."""
    names: set[str] = set()
    for folder in folders:
        names.add(folder.name)
        for path in folder.rglob("*"):
            if path.suffix == ".py" or (path.is_dir() and "__pycache__" not in path.parts):
                names.add(path.stem)
    return names


def third_party_imports(folders: list[Path], local: set[str]) -> dict[str, set[str]]:
    """Top-level third-party module -> the files that import it, anywhere in a file."""
    skip = set(sys.stdlib_module_names) | LATER_STDLIB | FIRST_PARTY | local | {"__future__"}
    found: dict[str, set[str]] = {}
    for folder in folders:
        for path in folder.rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    modules = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    modules = [node.module]
                else:
                    continue
                for module in modules:
                    top = module.split(".")[0]
                    if top not in skip:
                        found.setdefault(top, set()).add(str(path.relative_to(ROOT)))
    return found


def undeclared(folders: list[str], groups: list[str]) -> dict[str, list[str]]:
    """Imports in `folders` whose distribution is not in the given setup.cfg groups."""
    requirements = setup_cfg_requirements()
    allowed = {canonicalize_name(r.name) for group in groups for r in requirements[group]}
    distributions = packages_distributions()
    missing: dict[str, list[str]] = {}
    paths = [ROOT / folder for folder in folders]
    # The installed packages import each other by full name; elsewhere a bare name may be a
    # module beside the importer (conftest, helpers, bench's common).
    local = set() if folders == INSTALLED else local_names(paths)
    for module, files in third_party_imports(paths, local).items():
        # A module that is not installed here (the bench extra) is named by its distribution.
        names = {canonicalize_name(d) for d in distributions.get(module, [module])}
        if not names & allowed:
            missing[module] = sorted(files)
    return missing


def test_the_installed_packages_import_only_what_install_requires_declares() -> None:
    assert undeclared(INSTALLED, ["runtime"]) == {}


def test_tests_scripts_and_the_local_stack_import_only_runtime_and_dev_dependencies() -> None:
    assert undeclared(["tests", "scripts", "devstack"], ["runtime", "dev"]) == {}


def test_the_benchmarks_import_only_declared_dependencies() -> None:
    assert undeclared(["bench"], ["runtime", "dev", "bench"]) == {}


def test_every_dependency_declares_its_floor() -> None:
    sys.path.insert(0, str(ROOT / "scripts"))
    from floors import constraints

    floors = dict(line.split("==", 1) for line in constraints(setup_cfg_requirements()))
    assert Version(floors["yarl"]) >= Version("1.17")  # URL.host_port_subcomponent
    assert Version(floors["pytest-asyncio"]) >= Version("1.4")  # pytest_asyncio_loop_factories


def test_the_lock_pins_every_runtime_and_dev_dependency_inside_its_declared_range() -> None:
    pinned: dict[str, str] = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            pinned[canonicalize_name(name)] = version.strip()
    requirements = setup_cfg_requirements()
    wrong = [
        f"{r} (lock: {pinned.get(canonicalize_name(r.name))})"
        for r in requirements["runtime"] + requirements["dev"]
        if pinned.get(canonicalize_name(r.name)) is None
        or not r.specifier.contains(pinned[canonicalize_name(r.name)], prereleases=True)
    ]
    assert wrong == [], "run scripts/lock.sh"
    assert "periodic-checker" not in pinned
