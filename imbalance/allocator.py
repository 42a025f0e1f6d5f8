"""glibc malloc settings for training on a CPU: freed memory stays in the process for the next step.

PyTorch's CPU tensors come from plain malloc. glibc serves each block above its mmap threshold (32 MiB at
most) with a fresh `mmap` and unmaps it on free, and gives the heap's free top back to the system once it
passes the trim threshold. A CPU training step frees and re-allocates the same large tensors every step (a
batch of 64 float32 images at 224 px is 37 MiB, resnet18's activations at 224 px are hundreds), so each step
gets fresh pages, which the kernel faults in and zeroes one by one: converting a uint8 batch of that size to
float32 took 16 ms in a fresh tensor and 2 ms in a reused one (issue 18). With mmap off and the trim threshold
at its maximum, freed blocks are kept on the heap and reused, as jemalloc or tcmalloc would do
(benchmarks/RESULTS.md has the measured gain). The price is memory: the process keeps its peak heap (up to
2 GiB of free top) until it exits. glibc alone: elsewhere (macOS, musl) nothing changes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

# mallopt's parameters, from glibc's malloc.h
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_MMAP_MAX = -4
_INT_MAX = 2**31 - 1  # mallopt takes an int
# glibc's own behaviour once a run has freed its first large blocks: its dynamic mmap threshold has climbed to
# the 32 MiB cap and the trim threshold to twice that (setting either by mallopt freezes both, so this is the
# closest a process can come back to the defaults; the benchmark's "glibc-malloc" variant runs with it)
_DEFAULTS = {_M_MMAP_MAX: 65536, _M_MMAP_THRESHOLD: 32 << 20, _M_TRIM_THRESHOLD: 64 << 20}
_KEEP = {_M_MMAP_MAX: 0, _M_TRIM_THRESHOLD: _INT_MAX}

_state: bool | None = None  # True: keeping freed memory; False: the defaults above; None: never set


def _libc():
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def keep_freed_memory(keep: bool = True) -> bool:
    """Turn glibc's per-block mmap off and raise its trim threshold to the maximum (`keep`), for this process
    and the loader workers it forks later; or (not `keep`) go back to glibc's usual behaviour. True if the
    asked settings are in force; False where the C library is not glibc or refuses them. Numbers do not
    change, only where memory comes from."""
    global _state
    if _state == keep:
        return True
    libc = _libc()
    if libc is None:
        return False
    # mallopt returns 1 on success; a block too big for the heap still gets its own mmap (glibc's fallback)
    settings = _KEEP if keep else _DEFAULTS
    if not all(libc.mallopt(param, value) == 1 for param, value in settings.items()):
        return False
    _state = keep
    return True
