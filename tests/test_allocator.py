"""The C allocator settings of maemi_core/allocator.py, observed in glibc's own statistics
(mallinfo2): the keeping allocator leaves a freed large tensor's memory in the heap for the next
one; the returning allocator gives it back to the OS. Each in a fresh process (the settings are
process-wide)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

PROBE = """
import ctypes, ctypes.util, json, sys
from maemi_core import allocator

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.mallinfo2.restype = MallInfo2
applied = getattr(allocator, sys.argv[1])()
import torch
t = torch.ones(16 << 20)                 # 64 MiB
mapped_while_live = libc.mallinfo2().hblkhd
del t
print(json.dumps({"applied": applied, "mapped_while_live": mapped_while_live, "free_in_heap": libc.mallinfo2().fordblks}))
"""


def _probe(setting: str, allocator_env: str | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "MAEMI_ALLOCATOR"}
    if allocator_env is not None:
        env["MAEMI_ALLOCATOR"] = allocator_env
    out = subprocess.run([sys.executable, "-c", PROBE, setting], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_the_keeping_allocator_reuses_freed_tensor_memory_and_the_returning_one_gives_it_back():
    keep, give = _probe("use_keeping_allocator"), _probe("use_returning_allocator")
    assert keep["applied"] and give["applied"]
    # kept: the tensor came from the heap, and its 64 MiB stay there, free for the next tensor
    assert keep["mapped_while_live"] < 16 << 20 and keep["free_in_heap"] >= 64 << 20
    # returned: the tensor was its own mapping, unmapped when freed
    assert give["mapped_while_live"] >= 64 << 20 and give["free_in_heap"] < 64 << 20


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_maemi_allocator_glibc_leaves_glibcs_defaults():
    """The switch the benchmarks' baseline (and a process short of memory) uses: nothing is set,
    so glibc maps the 64 MiB tensor on its own, as it does without this module."""
    plain = _probe("use_keeping_allocator", allocator_env="glibc")
    assert not plain["applied"] and plain["mapped_while_live"] >= 64 << 20
    out = subprocess.run([sys.executable, "-c", "from maemi_core import allocator; allocator.use_keeping_allocator()"],
                         capture_output=True, text=True, timeout=120, env=os.environ | {"MAEMI_ALLOCATOR": "tcmalloc"})
    assert out.returncode != 0 and "use keeping (the default) or glibc" in out.stderr
