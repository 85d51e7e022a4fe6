"""A kernel's autotune source hash covers every @triton.jit function it calls, transitively,
wherever it is defined: an edit to a shared helper retires the tuned entries of every
kernel that calls it, though the kernel's own text and its `sources=` list are unchanged.

The hash is Triton's `JITFunction.cache_key`, computed by compiled Triton (no
TRITON_INTERPRET: the interpreter's functions have no cache_key). So the checks run in
subprocesses without the interpreter; neither needs a GPU driver."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

HELPERS = '''
import triton
import triton.language as tl


@triton.jit
def helper(x):
    return x + {increment}
'''

KERNEL = '''
import triton
import triton.language as tl

from {helpers} import helper


@triton.jit
def kernel(X):
    tl.store(X, helper(tl.load(X)))
'''

# Loads each variant's helper and kernel modules under their own names (one process, so one
# import of tritium), declares a kernel over the root alone, as the kernels' hand-written
# `sources=` lists do, and prints every hash: the variants' and the library kernels'.
SCRIPT = '''
import importlib, json, sys
sys.path.insert(0, sys.argv[1])
from tritium import autotune
from tritium.runtime import interpreted
assert not interpreted()
config = autotune.Config({"BLOCK": 1}, num_warps=1, num_stages=1)
probes = {}
for variant in sys.argv[2:]:
    module = importlib.import_module(f"kernel_{variant}")
    kernel = autotune.Kernel(f"probe_{variant}", space={"BLOCK": (1,), "num_warps": (1,), "num_stages": (1,)},
                             key=lambda: {}, default=lambda: config, interpreter=config, sources=(module.kernel,))
    probes[variant] = kernel.source_hash
library = {name: k.source_hash for name, k in autotune.KERNELS.items() if not name.startswith("probe_")}
print(json.dumps({"probes": probes, "library": library}))
'''

VARIANTS = {"a": 1, "same_as_a": 1, "edited": 2}  # the helper's increment


def _hashes(tmp_path) -> dict:
    for variant, increment in VARIANTS.items():
        (tmp_path / f"helpers_{variant}.py").write_text(HELPERS.format(increment=increment))
        (tmp_path / f"kernel_{variant}.py").write_text(KERNEL.format(helpers=f"helpers_{variant}"))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(SCRIPT), str(tmp_path), *VARIANTS],
                          env=env, cwd=root, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def hashes(tmp_path_factory) -> dict:
    return _hashes(tmp_path_factory.mktemp("probes"))


def test_hash_follows_helpers_in_other_modules(hashes):
    """Same text everywhere: same hash. Only the helper (in another module) edited: another
    hash, though the kernel's own source is the same text."""
    probes = hashes["probes"]
    assert all(len(h) == 16 for h in probes.values())
    assert probes["a"] == probes["same_as_a"]
    assert probes["edited"] != probes["a"], "an edit to a helper left the kernel's source hash unchanged"


def test_library_hashes_are_stable_across_processes(hashes, tmp_path):
    """Every tritium kernel hashes under compiled Triton without a GPU, to the same value in
    another process (a tuned entry written by one run is found by the next)."""
    first, second = hashes["library"], _hashes(tmp_path)["library"]
    assert first and first == second
    assert len(set(first.values())) == len(first), "two kernels share a source hash"
