"""What the autotune store does with files it did not write: configs outside a kernel's
space, corrupt, hostile or foreign files, symlinked locks, orphan temp files. None of them
may raise from a kernel call, reach a launch, or be overwritten; each earns one warning."""

import errno
import json
import os
import time
import warnings

import pytest
import test_autotune
import torch
import triton
from conftest import DEVICE
from test_autotune import OTHER_SKU, SKU, fake_timer, launch_recorder, toy_kernel

import tritium
from tritium import autotune, reference
from tritium.autotune import store
from tritium.autotune.device import Sku
from tritium.kernels.attention import ATTENTION_FWD

BUCKET = "n=64,dtype=f16"  # toy_kernel's bucket for n=64 (BLOCK 16, 32 and 64 all fit)
GOOD = {"BLOCK": 32, "num_warps": 8, "num_stages": 2}
gpu_world = test_autotune.gpu_world  # the fixture: a fake SKU, a private cache dir, no shipped tables


def _entry(kernel, config):
    return {"config": config, "source": kernel.source_hash, "triton": triton.__version__, "ms": 1.0,
            "default_ms": 2.0}


def _write_file(path, kernel_name, buckets, sku=SKU):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"schema": store.SCHEMA, "sku": sku.to_json(), "entries": {kernel_name: buckets}}))


def _valid_for(kernel, bucket, config):
    return config in kernel.candidates(bucket) or config == kernel.default(**bucket)


@pytest.mark.parametrize("where", ["cache", "table"])
@pytest.mark.parametrize("config, n, says", [
    ({**GOOD, "BLOCK": -16}, 64, "BLOCK=-16"),
    ({**GOOD, "BLOCK": 128}, 128, "BLOCK=128"),  # not a candidate, though the bucket would fit it
    ({**GOOD, "num_warps": -4}, 64, "num_warps=-4"),
    ({**GOOD, "num_warps": 16}, 64, "num_warps=16"),
    ({**GOOD, "num_stages": 0}, 64, "num_stages=0"),
    ({**GOOD, "BLOCK": 64}, 32, "pruned"),  # a candidate, but not for n=32
    ({"num_warps": 8, "num_stages": 2}, 64, "missing"),
    ({**GOOD, "EXTRA": 1}, 64, "EXTRA"),
    ({**GOOD, "BLOCK": 32.5}, 64, "BLOCK=32.5"),
    ({**GOOD, "BLOCK": "32"}, 64, "BLOCK='32'"),
    ({**GOOD, "num_warps": True}, 64, "num_warps=True"),
    ([32, 8, 2], 64, "not an object"),
])
def test_invalid_configs_never_reach_a_launch(gpu_world, where, config, n, says):
    kernel = toy_kernel()
    bucket = kernel.key(n=n, dtype="f16")
    name = autotune.bucket_name(bucket)
    path = store.cache_path(SKU) if where == "cache" else store.shipped_path(SKU)
    _write_file(path, "toy", {name: _entry(kernel, config)})
    launched = []
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for tune in (False, False, True):  # a new process each time: files are read again
            autotune.reset()
            with autotune.tuning(enabled=tune, timer=fake_timer):
                launched.append(kernel.lookup(launch_recorder(launched), n=n, dtype="f16"))
            launched.append(kernel.lookup(None, n=n, dtype="f16"))
    assert launched and all(_valid_for(kernel, bucket, c) for c in launched), launched
    messages = [str(w.message) for w in record]
    assert len(messages) == 1, messages
    assert str(path) in messages[0] and name in messages[0] and "toy" in messages[0] and says in messages[0]


def test_invalid_entry_among_valid_ones_drops_only_itself(gpu_world):
    kernel = toy_kernel()
    path = store.cache_path(SKU)
    _write_file(path, "toy", {BUCKET: _entry(kernel, GOOD), "n=32,dtype=f16": 5})
    with pytest.warns(RuntimeWarning, match="n=32,dtype=f16"):
        assert kernel.lookup(None, n=32, dtype="f16") == kernel.default()
    assert kernel.lookup(None, n=64, dtype="f16").meta == {"BLOCK": 32}


def test_stale_entries_are_skipped_silently(gpu_world):
    """Entries of another kernel source or Triton version are not invalid, just old."""
    kernel = toy_kernel()
    old = {**_entry(kernel, {**GOOD, "BLOCK": -16}), "source": "0123456789abcdef"}
    _write_file(store.cache_path(SKU), "toy", {BUCKET: old})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert kernel.lookup(None, n=64, dtype="f16") == kernel.default()


def test_a_tuned_default_outside_the_space_is_kept(gpu_world):
    """The tuner saves the heuristic default when it wins; it need not be a candidate."""
    kernel = toy_kernel()
    kernel.default = lambda **_: autotune.Config({"BLOCK": 8}, num_warps=2, num_stages=1)
    _write_file(store.cache_path(SKU), "toy", {BUCKET: _entry(kernel, {"BLOCK": 8, "num_warps": 2, "num_stages": 1})})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert kernel.lookup(None, n=64, dtype="f16") == kernel.default()
    assert autotune.STATS["toy", "cache"] >= 1


def test_export_skips_configs_outside_the_space(gpu_world):
    kernel = toy_kernel()
    _write_file(store.cache_path(SKU), "toy", {BUCKET: _entry(kernel, GOOD),
                                               "n=32,dtype=f16": _entry(kernel, {**GOOD, "BLOCK": -16})})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert list(autotune.valid_entries(SKU)["toy"]) == [BUCKET]


def test_attention_never_launches_a_bad_cached_config(gpu_world, monkeypatch):
    """Through the real op: BLOCK_M=-16 in the cache used to launch zero programs and
    return uninitialised memory."""
    q, k, v = (torch.randn(1, 16, 1, 32, device=DEVICE) for _ in range(3))
    bucket = ATTENTION_FWD.key(head_dim=32, dtype=q.dtype, seqlen_q=16, seqlen_k=16, window_left=-1,
                               window_right=0, softcap=0.0, group=1)
    bad = {"BLOCK_M": -16, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2}
    _write_file(store.cache_path(SKU), "attention_fwd", {autotune.bucket_name(bucket): _entry(ATTENTION_FWD, bad)})
    with pytest.warns(RuntimeWarning, match="BLOCK_M=-16"):
        out = tritium.flash_attention(q, k, v, causal=True)
    truth = reference.attention(q.double(), k.double(), v.double(), causal=True)
    assert torch.allclose(out.double(), truth, atol=1e-5)


def _deep(depth):
    return "[" * depth + "]" * depth


def _file(entries='{}', sku=None):
    return '{"schema": "%s", "sku": %s, "entries": %s}' % (store.SCHEMA, json.dumps((sku or SKU).to_json()), entries)


BAD_FILES = {
    "invalid UTF-8": (b'{"schema": "\xff\xfe"}', "UTF-8"),
    "invalid UTF-8 in an entry": (_file('{"toy": {"n=64,dtype=f16": {"source": "\xc3("}}}').encode("latin-1"), "UTF-8"),
    "deep nesting": (_deep(100_000).encode(), "nested"),
    "deep nesting in an entry": (_file('{"toy": {"b": {"ms": %s}}}' % _deep(100)).encode(), "nested"),
    "1e999": (_file('{"toy": {"n=64,dtype=f16": {"config": {"BLOCK": 1e999}}}}').encode(), "non-finite"),
    "NaN": (_file('{"toy": {"n=64,dtype=f16": {"ms": NaN}}}').encode(), "non-finite"),
    "-Infinity": (_file('{"toy": {"n=64,dtype=f16": {"ms": -Infinity}}}').encode(), "non-finite"),
    "huge integer": (_file('{"toy": {"b": {"ms": %s}}}' % ("9" * 5000)).encode(), "not valid JSON"),
    "not JSON": (b"{not json", "not valid JSON"),
    "truncated": (_file()[:40].encode(), "not valid JSON"),
    "top-level list": (b"[]", "not a tritium-autotune/1 file"),
    "top-level string": (b'"tritium-autotune/1"', "not a tritium-autotune/1 file"),
    "other schema": (b'{"schema": "something-else/3", "entries": {}}', "not a tritium-autotune/1 file"),
    "other SKU": (_file(sku=OTHER_SKU).encode(), "tuned for another GPU"),
    "entries a list": (_file("[]").encode(), "malformed 'entries'"),
    "kernel a list": (_file('{"toy": []}').encode(), "malformed 'entries'"),
}


@pytest.mark.parametrize("content, reason", BAD_FILES.values(), ids=BAD_FILES.keys())
def test_bad_files_warn_once_are_ignored_and_kept(gpu_world, content, reason):
    path = store.cache_path(SKU)
    path.parent.mkdir(parents=True)
    path.write_bytes(content)
    with pytest.warns(RuntimeWarning, match=reason):
        assert store.read_table(path, SKU) == {}
    kernel = toy_kernel()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        assert store.read_table(path, SKU) == {}  # no second warning
        assert kernel.lookup(None, n=64, dtype="f16") == kernel.default()
        assert not record, [str(w.message) for w in record]
        # Tuning (in a new process) keeps its results in memory and the file as it was.
        autotune.reset()
        assert _tune(kernel).meta == {"BLOCK": 32}
        assert _tune(kernel, n=32).meta == {"BLOCK": 32}
    messages = [str(w.message) for w in record]
    assert len(messages) == 1 and "not saving" in messages[0] and str(path) in messages[0], messages
    assert path.read_bytes() == content
    assert kernel.lookup(None, n=64, dtype="f16").meta == {"BLOCK": 32}  # memo


def _tune(kernel, n=64):
    with autotune.tuning(timer=fake_timer):
        return kernel.lookup(launch_recorder([]), n=n, dtype="f16")


def test_file_over_the_size_cap_is_not_read(gpu_world, monkeypatch):
    path = store.cache_path(SKU)
    path.parent.mkdir(parents=True)
    with open(path, "wb") as f:  # sparse: no disk, and nothing may read it
        f.truncate(store.MAX_BYTES + 1)
    with pytest.warns(RuntimeWarning, match="larger than"):
        assert store.read_table(path, SKU) == {}
    with pytest.warns(RuntimeWarning, match="not saving"):
        _tune(toy_kernel())
    assert path.stat().st_size == store.MAX_BYTES + 1


@pytest.mark.parametrize("kind", ["fifo", "directory"])
def test_not_a_regular_file_is_refused_without_blocking(gpu_world, kind):
    path = store.cache_path(SKU)
    path.parent.mkdir(parents=True)
    os.mkfifo(path) if kind == "fifo" else path.mkdir()
    with pytest.warns(RuntimeWarning, match="not a regular file"):
        assert store.read_table(path, SKU) == {}
    with pytest.warns(RuntimeWarning, match="not saving"):
        assert _tune(toy_kernel()).meta == {"BLOCK": 32}
    assert path.is_fifo() if kind == "fifo" else path.is_dir()


def test_unreadable_file_is_not_overwritten(gpu_world, monkeypatch):
    """chmod 000 does not stop root, so the read is made to fail as it would for a user."""
    path = store.cache_path(SKU)
    _write_file(path, "toy", {})
    before = path.read_bytes()

    def denied(p, read=store._read):
        if p == path:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(p))
        return read(p)

    monkeypatch.setattr(store, "_read", denied)
    with pytest.warns(RuntimeWarning) as record:
        assert _tune(toy_kernel()).meta == {"BLOCK": 32}
        assert _tune(toy_kernel(), n=32).meta == {"BLOCK": 32}
    messages = [str(w.message) for w in record]
    assert len(messages) == 2 and "unreadable" in messages[0] and "not saving" in messages[1], messages
    assert path.read_bytes() == before


def test_files_of_other_skus_have_other_names():
    base = Sku("NVIDIA H100 80GB HBM3", 132, 80, "9.0")
    variants = [base, Sku(base.name, 132, 94, "9.0"), Sku(base.name, 114, 80, "9.0"), Sku(base.name, 132, 80, "10.0"),
                Sku("NVIDIA H100 PCIe", 132, 80, "9.0")]
    names = {store.cache_path(sku).name for sku in variants}
    assert len(names) == len(variants)
    assert store.cache_path(base).name == "nvidia-h100-80gb-hbm3-132sm-80gib-cc90.json"


def test_a_file_of_another_identity_is_not_read(gpu_world):
    """A file under this SKU's old name (name and SM count only) belongs to no one now."""
    old = store.cache_dir() / "nvidia-fake-h100-132sm.json"
    _write_file(old, "toy", {BUCKET: _entry(toy_kernel(), GOOD)}, sku=Sku(SKU.name, 132, 94, "9.0"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert toy_kernel().lookup(None, n=64, dtype="f16") == toy_kernel().default()


@pytest.mark.parametrize("target_exists", [True, False])
def test_symlinked_lock_is_not_followed(gpu_world, target_exists):
    path = store.cache_path(SKU)
    path.parent.mkdir(parents=True)
    target = gpu_world / "elsewhere"
    if target_exists:
        target.write_text("precious")
        os.utime(target, (1_000_000, 1_000_000))
    lock = path.with_name(path.name + ".lock")
    lock.symlink_to(target)
    with pytest.warns(RuntimeWarning, match="symlink") as record:
        assert _tune(toy_kernel()).meta == {"BLOCK": 32}
        assert _tune(toy_kernel(), n=32).meta == {"BLOCK": 32}
    assert len(record) == 1
    assert lock.is_symlink()
    if target_exists:
        assert target.read_text() == "precious" and target.stat().st_mtime == 1_000_000
    else:
        assert not target.exists()
    assert not path.exists()


def test_stale_temp_files_are_removed_fresh_ones_kept(gpu_world):
    path = store.cache_path(SKU)
    path.parent.mkdir(parents=True)
    old = time.time() - store.STALE_TEMP_SECONDS - 60
    stale = path.parent / f".{path.name}.a1b2_c3d.tmp"
    fresh = path.parent / f".{path.name}.e4f5g6h7.tmp"
    others = [path.parent / f".{path.name}.short.tmp", path.parent / "notes.tmp", path.parent / f"{path.name}.x1y2z3w4.tmp",
              path.parent / ".other.json.a1b2c3d4.tmp"]
    for file in (stale, fresh, *others):
        file.write_text("{")
        if file is not fresh:
            os.utime(file, (old, old))
    _tune(toy_kernel())
    assert not stale.exists()
    assert fresh.exists() and all(file.exists() for file in others)
    assert "toy" in json.loads(path.read_text())["entries"]
