"""glibc malloc settings for training on a CPU: freed memory stays in the process for the next step.

PyTorch's CPU tensors come from plain malloc. glibc serves each block above its mmap threshold (32 MiB at
most) with a fresh `mmap` and unmaps it on free, and gives the heap's free top back to the system once it
passes the trim threshold. A CPU training step frees and re-allocates the same large tensors every step (a
batch of 64 float32 images at 224 px is 37 MiB), so each step got fresh pages, which the kernel faults in and
zeroes one by one: converting a uint8 batch of that size to float32 took 16 ms in a fresh tensor and 2 ms in a
reused one (issue 18). With mmap off and the trim threshold at its maximum, freed blocks are kept on the heap
and reused, as jemalloc or tcmalloc would do (benchmarks/RESULTS.md has the measured gain).

The price is memory, and it is not only the peak. PyTorch's blocks are 64-byte aligned, and an aligned block
leaves a small piece beside the hole it frees, so the next block of the same size may not fit there and the
heap grows instead, until it has holes to spare: a loop of one 64 MiB tensor settled at about 6 times that
size, a training loop at 8-13% more memory than with glibc's defaults (a reviewer's measurements). glibc
alone: elsewhere (macOS, musl) nothing changes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

# mallopt's parameters, from glibc's malloc.h, and glibc's default for the one that can be put back exactly
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_DEFAULT_MMAP_MAX = 65536
_INT_MAX = 2**31 - 1  # mallopt takes an int

_applied = False


def _libc():
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def keep_freed_memory() -> bool:
    """Turn glibc's per-block mmap off and raise its trim threshold to the maximum, for this process and the
    loader workers it forks later. True if the settings are in force (now or from an earlier call); False
    where the C library is not glibc or refuses them (then mmap is left on). Numbers do not change, only
    where memory comes from. There is no way back within the process: setting a threshold freezes glibc's
    dynamic ones, so compare the two in separate processes (`experiments.benchmark --glibc-malloc`)."""
    global _applied
    if _applied:
        return True
    libc = _libc()
    if libc is None:
        return False
    # mallopt returns 1 on success; a block too big for the heap still gets its own mmap (glibc's fallback)
    if libc.mallopt(_M_MMAP_MAX, 0) != 1:
        return False
    if libc.mallopt(_M_TRIM_THRESHOLD, _INT_MAX) != 1:
        libc.mallopt(_M_MMAP_MAX, _DEFAULT_MMAP_MAX)  # not half of it: without the trim threshold the heap shrinks
        return False
    _applied = True
    return True
