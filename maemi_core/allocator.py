"""How the process's C allocator serves torch's large tensors (glibc only; elsewhere nothing changes).

**Returning allocator**: glibc keeps freed heap memory in its arenas, so a training loop's
resident size grows to the sum of two steps' activation peaks and never shrinks. With
``mallopt(M_MMAP_THRESHOLD, 64 KiB)`` large tensors are mapped and unmapped, and the peak
is what is live. The benchmark applies it to every variant it compares.

The opposite, the **keeping allocator** (:func:`use_keeping_allocator`), is what every torch
step of the pipeline and every serving process uses: glibc's default still maps some large
tensors and trims the heap's free top back to the OS, so the next tensor of that size is
faulted in again page by page. On this project's virtual machines a fresh 17 MB tensor cost
about 50 ms of page faults, more than the operation that filled it (a SiLU over it took 55 ms
instead of about 2); with every tensor below 2 GiB taken from the heap and the heap never
trimmed, the pages are reused: synthetic training steps ran 1.43-1.50x faster with bf16 base
matmuls and 1.27-1.49x in fp32, the process's sys time halved and its peak resident size stayed
the same (``bench/training_efficiency.py``, docs/performance.md). The price: freed memory stays
with the process up to its peak (glibc's default also keeps much of it: ``low_memory_allocator``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
_KEEP = 2**31 - 1   # mallopt takes an int: every allocation under 2 GiB from the heap, never trimmed


def _mallopt(*settings: tuple[int, int]) -> bool:
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        return all(bool(libc.mallopt(param, value)) for param, value in settings)
    except (OSError, AttributeError):
        return False


ALLOCATOR_ENV = "MAEMI_ALLOCATOR"   # "glibc": leave glibc's defaults (a process short of memory; the benchmarks' baseline)


def use_keeping_allocator() -> bool:
    """Large tensors from the heap, and freed memory kept for the next one instead of being
    unmapped or trimmed (module docstring). glibc only; returns False where it does not apply,
    or where ``MAEMI_ALLOCATOR=glibc`` keeps glibc's defaults.
    ``use_returning_allocator`` afterwards overrides it (training's ``low_memory_allocator``)."""
    choice = os.environ.get(ALLOCATOR_ENV, "keeping")
    if choice not in ("keeping", "glibc"):
        raise ValueError(f"{ALLOCATOR_ENV}={choice!r}: use keeping (the default) or glibc")
    if choice == "glibc":
        return False
    return _mallopt((M_MMAP_THRESHOLD, _KEEP), (M_TRIM_THRESHOLD, _KEEP))


def use_returning_allocator(threshold: int = 1 << 16) -> bool:
    """Large allocations go straight to mmap (freed memory returns to the OS). glibc only;
    returns False where it does not apply."""
    return _mallopt((M_MMAP_THRESHOLD, threshold))
