"""Memory freed after a start-up is given back to the system, not left resident."""

from __future__ import annotations

import subprocess
import sys

from conftest import ROOT

PROGRAM = """
import gc
from periodic_checker.memory import give_back_free_memory

def resident_mb():
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024

# As a start-up leaves the heap: many objects dropped (larger than those Python pools itself),
# a few kept among them (so the free memory is not all at the heap's end, where glibc gives it
# back by itself).
made = [bytes(1000) for _ in range(100_000)]
kept = made[::100]
del made
gc.collect()
before = resident_mb()
given = give_back_free_memory()
print(given, round(before - resident_mb()))
"""


def test_memory_freed_by_a_start_up_leaves_the_resident_set() -> None:
    done = subprocess.run(
        [sys.executable, "-c", PROGRAM], cwd=ROOT, capture_output=True, text=True, check=True
    )
    given, dropped_mb = done.stdout.split()
    assert given == "True"
    assert int(dropped_mb) > 50  # of about 100 MB freed
