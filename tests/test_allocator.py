"""The CPU runs' malloc settings (imbalance.allocator): a freed large block is reused, not faulted in again."""

from __future__ import annotations

import subprocess
import sys

import pytest

import imbalance.train as train
from experiments import run as run_cli
from imbalance import allocator

glibc = pytest.mark.skipif(allocator._libc() is None, reason="glibc's malloc settings")  # the module's own test

# Page faults of a 64 MiB block allocated as PyTorch does, written and freed once more: in a fresh process, with glibc's
# defaults and then after keep_freed_memory(). Run in a child, since the settings hold for the whole process.
FAULTS = """
import ctypes, resource
from imbalance.allocator import keep_freed_memory

libc = ctypes.CDLL("libc.so.6")
libc.posix_memalign.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_size_t, ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
SIZE = 64 << 20


def write_and_free_a_block():  # as a PyTorch CPU tensor is allocated (c10: posix_memalign, 64-byte aligned)
    block = ctypes.c_void_p()
    assert libc.posix_memalign(ctypes.byref(block), 64, SIZE) == 0
    ctypes.memset(block, 1, SIZE)
    libc.free(block)


def faults_of_a_reused_block():
    # allocated and freed a few times first: an aligned block leaves a small chunk beside the hole it frees, so
    # the heap takes a few rounds before a freed hole is large enough to serve the next block
    for _ in range(12):
        write_and_free_a_block()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    write_and_free_a_block()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


default = faults_of_a_reused_block()
applied = keep_freed_memory()
print(default, applied, faults_of_a_reused_block())
"""


@glibc
def test_a_freed_large_block_is_reused_without_page_faults():
    out = subprocess.run([sys.executable, "-c", FAULTS], capture_output=True, text=True, timeout=120, check=True)
    default, applied, kept = out.stdout.split()
    if int(default) < 16:  # e.g. jemalloc preloaded, or glibc told so by the environment: nothing to show
        pytest.skip(f"the default allocator already reuses the block ({default} faults)")
    assert applied == "True"
    # 64 MiB is 16,384 pages of 4 KiB (32 huge pages): the default faults each in again, the settings none
    assert int(kept) * 10 < int(default), (default, kept)


def test_a_cpu_run_applies_the_settings(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(train, "keep_freed_memory", lambda: calls.append(True) or True)
    monkeypatch.chdir(tmp_path)
    args = ["--backbone", "test_resnet", "--image-size", "32", "--accelerator", "cpu", "--fast-dev-run"]
    assert run_cli.main(args) == 0
    assert calls == [True]


class FakeLibc:
    def __init__(self, refuse: int | None = None) -> None:
        self.refuse, self.calls = refuse, []

    def mallopt(self, param: int, value: int) -> int:
        self.calls.append((param, value))
        return 0 if param == self.refuse else 1


@pytest.mark.parametrize(
    "refuse, calls, applied",
    [
        (None, [(-4, 0), (-1, 2**31 - 1)], True),
        (-4, [(-4, 0)], False),
        # refused halfway: mmap goes back on, since without the trim threshold the heap would shrink anyway
        (-1, [(-4, 0), (-1, 2**31 - 1), (-4, 65536)], False),
    ],
)
def test_the_settings_are_applied_whole_or_not_at_all(monkeypatch, refuse, calls, applied):
    libc = FakeLibc(refuse)
    monkeypatch.setattr(allocator, "_libc", lambda: libc)
    monkeypatch.setattr(allocator, "_applied", False)
    assert allocator.keep_freed_memory() is applied and libc.calls == calls
    assert allocator.keep_freed_memory() is applied  # once applied, a second call does nothing more
    assert libc.calls[: len(calls)] == calls and (len(libc.calls) == len(calls)) is applied


def test_elsewhere_than_glibc_nothing_changes(monkeypatch):
    monkeypatch.setattr(allocator.platform, "libc_ver", lambda: ("", ""))
    monkeypatch.setattr(allocator, "_applied", False)
    assert allocator._libc() is None and allocator.keep_freed_memory() is False
