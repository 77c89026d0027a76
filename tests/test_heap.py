"""The CLI's heap setting: a freed large buffer comes back without page faults (glibc only)."""
import subprocess
import sys

import pytest

from llamavit.heap import keep_freed_memory

# allocate, fill and free a 64 MB tensor three times; the minor page faults of the last time
_PROBE = """
import resource, sys, torch
from llamavit.heap import keep_freed_memory
tuned = keep_freed_memory() if sys.argv[1] == "tuned" else None
for _ in range(3):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(16 * 2 ** 20).sum()
print(tuned, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str):
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, check=True)
    tuned, faults = out.stdout.split()
    return tuned, int(faults)


def test_keep_freed_memory_stops_page_faults_on_reallocation():
    default_tuned, default_faults = _faults("default")
    tuned, tuned_faults = _faults("tuned")
    if tuned != "True":
        pytest.skip("not glibc malloc: keep_freed_memory does nothing here")
    assert default_tuned == "None"
    # 64 MB is 16,384 pages of 4 KB: glibc mmaps it afresh by default, keeps it once told to
    assert default_faults > 8000
    assert tuned_faults < 1000


def test_keep_freed_memory_leaves_the_users_malloc_settings(monkeypatch):
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "0")
    assert keep_freed_memory() is False
