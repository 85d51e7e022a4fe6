"""The autotune layer without a GPU: a fake SKU, a fake launch and an injected timer."""

import json
import multiprocessing
import warnings

import pytest
import torch
import triton

from tritium import autotune
from tritium.autotune import kernel as kernel_module
from tritium.autotune import store
from tritium.autotune.device import Sku
from tritium.kernels.attention_tuning import attention_bucket

SKU = Sku("NVIDIA Fake H100", 132, 80, "9.0")
OTHER_SKU = Sku("NVIDIA Fake H200", 132, 141, "9.0")


def _toy_source_a():
    return 1


def _toy_source_b():
    return 2


def toy_kernel(name="toy", source=_toy_source_a):
    return autotune.Kernel(
        name,
        space={"BLOCK": (16, 32, 64), "num_warps": (4, 8), "num_stages": (2,)},
        key=lambda n, dtype: {"n": triton.next_power_of_2(n), "dtype": dtype},
        default=lambda **_: autotune.Config({"BLOCK": 16}, num_warps=4, num_stages=2),
        interpreter=autotune.Config({"BLOCK": 16}, num_warps=1, num_stages=1),
        sources=(source,),
        prune=lambda config, bucket: config.meta["BLOCK"] <= bucket["n"],
    )


def fake_timer(fn):
    """The time a config 'takes' is whatever the fake launch recorded for it."""
    fn()
    return fake_timer.last


def launch_recorder(calls):
    def launch(config):
        calls.append(config)
        # BLOCK=32 with 8 warps is the fastest; everything else costs more.
        fake_timer.last = abs(config.meta["BLOCK"] - 32) / 8 + (0.5 if config.num_warps == 4 else 0.1)

    return launch


@pytest.fixture
def gpu_world(tmp_path, monkeypatch):
    """Pretend to be on a GPU with SKU, a private cache dir and an empty shipped dir."""
    monkeypatch.setenv("TRITIUM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(store, "SHIPPED_DIR", tmp_path / "shipped")
    monkeypatch.setattr(kernel_module, "interpreted", lambda: False)
    monkeypatch.setattr(kernel_module, "current_sku", lambda: SKU)
    autotune.reset()
    store._warned.clear()
    yield tmp_path
    autotune.reset()
    for name in [n for n in autotune.KERNELS if n.startswith("toy")]:
        del autotune.KERNELS[name]


def test_interpreter_gets_its_config_without_tuning_or_warnings(monkeypatch):
    monkeypatch.setattr(kernel_module, "interpreted", lambda: True)
    kernel = toy_kernel("toy_interp")
    monkeypatch.delitem(autotune.KERNELS, "toy_interp")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with autotune.tuning(timer=fake_timer):
            assert kernel.lookup(lambda c: pytest.fail("tuned under the interpreter"), n=100, dtype="f16") is kernel.interpreter


def test_tunes_on_miss_saves_and_reloads(gpu_world):
    kernel = toy_kernel()
    calls = []
    with autotune.tuning(timer=fake_timer):
        config = kernel.lookup(launch_recorder(calls), n=100, dtype="f16")
    assert config.meta == {"BLOCK": 32} and config.num_warps == 8
    tried = {(c.meta["BLOCK"], c.num_warps) for c in calls}
    assert tried == {(16, 4), (16, 8), (32, 4), (32, 8), (64, 4), (64, 8)}  # 128 would be pruned
    data = json.loads(store.cache_path(SKU).read_text())
    entry = data["entries"]["toy"]["n=128,dtype=f16"]
    assert entry["config"] == {"BLOCK": 32, "num_warps": 8, "num_stages": 2}
    assert entry["default_ms"] > entry["ms"] and entry["triton"] == triton.__version__

    autotune.reset()  # a new process: the cache answers, nothing is tuned
    autotune.STATS.clear()
    assert kernel.lookup(lambda c: pytest.fail("tuned again"), n=120, dtype="f16") == config
    assert kernel.lookup(None, n=127, dtype="f16") == config
    assert autotune.STATS["toy", "cache"] == 1 and kernel.memo_hits == 1


def test_no_tuning_unless_asked(gpu_world):
    kernel = toy_kernel()
    config = kernel.lookup(lambda c: pytest.fail("tuned without being asked"), n=100, dtype="f16")
    assert config == kernel.default()
    assert not store.cache_path(SKU).exists()


def _tune_once(kernel):
    with autotune.tuning(timer=fake_timer):
        return kernel.lookup(launch_recorder([]), n=64, dtype="f16")


def test_source_hash_triton_version_and_sku_invalidate(gpu_world, monkeypatch):
    _tune_once(toy_kernel(source=_toy_source_a))
    autotune.reset()
    edited = toy_kernel(source=_toy_source_b)
    assert edited.lookup(None, n=64, dtype="f16") == edited.default(), "an edited kernel reused old entries"

    autotune.reset()
    monkeypatch.setattr(triton, "__version__", "0.0.0-other")
    assert toy_kernel().lookup(None, n=64, dtype="f16") == toy_kernel().default()
    monkeypatch.undo()

    monkeypatch.setenv("TRITIUM_CACHE_DIR", str(gpu_world / "cache"))
    monkeypatch.setattr(store, "SHIPPED_DIR", gpu_world / "shipped")
    monkeypatch.setattr(kernel_module, "interpreted", lambda: False)
    monkeypatch.setattr(kernel_module, "current_sku", lambda: OTHER_SKU)
    autotune.reset()
    assert toy_kernel().lookup(None, n=64, dtype="f16") == toy_kernel().default()
    assert store.cache_path(OTHER_SKU) != store.cache_path(SKU)


def test_shipped_table_then_cache_precedence(gpu_world):
    kernel = toy_kernel()
    bucket = "n=64,dtype=f16"
    entry = {"source": kernel.source_hash, "triton": triton.__version__, "ms": 1.0, "default_ms": 2.0}
    store.write_entries(store.shipped_path(SKU), SKU, {"toy": {bucket: {**entry, "config": {"BLOCK": 64, "num_warps": 4, "num_stages": 2}}}})
    assert kernel.lookup(None, n=64, dtype="f16").meta == {"BLOCK": 64}
    store.write_entries(store.cache_path(SKU), SKU, {"toy": {bucket: {**entry, "config": {"BLOCK": 32, "num_warps": 4, "num_stages": 2}}}})
    autotune.reset()
    assert kernel.lookup(None, n=64, dtype="f16").meta == {"BLOCK": 32}


def test_unwritable_path_keeps_results_in_memory(gpu_world, monkeypatch):
    """A file where the cache directory should be: unwritable for every user, root included
    (root ignores permission bits)."""
    blocker = gpu_world / "blocked"
    blocker.write_text("a file, not a directory")
    monkeypatch.setenv("TRITIUM_CACHE_DIR", str(blocker))
    with pytest.warns(RuntimeWarning) as record:
        config = _tune_once(toy_kernel())
    messages = [str(w.message) for w in record]
    assert any("unreadable" in m for m in messages) and any("cannot write" in m for m in messages)
    assert config.meta == {"BLOCK": 32}
    assert toy_kernel().lookup(None, n=64, dtype="f16") == config  # memo


def _writer(path, start):
    for i in range(start, start + 25):
        entry = {"config": {"BLOCK": 16, "num_warps": 4, "num_stages": 2}, "source": "s", "triton": "t", "ms": i}
        store.write_entries(path, SKU, {"toy": {f"n={i}": entry}})


def test_concurrent_writers_lose_nothing(tmp_path):
    path = tmp_path / "autotune" / "fake.json"
    context = multiprocessing.get_context("fork")
    procs = [context.Process(target=_writer, args=(path, start)) for start in (0, 1000)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
        assert p.exitcode == 0
    entries = json.loads(path.read_text())["entries"]["toy"]
    assert len(entries) == 50


def test_attention_buckets():
    base = dict(head_dim=128, dtype=torch.bfloat16, window_left=-1, window_right=0, softcap=0.0, group=2)
    a = attention_bucket(seqlen_q=1000, seqlen_k=1000, **base)
    assert a == attention_bucket(seqlen_q=1024, seqlen_k=1024, **base)
    assert a != attention_bucket(seqlen_q=1025, seqlen_k=1025, **base)
    assert a["mask"] == "causal" and a["seqlen_q"] == 1024 and a["window"] == 0
    w = attention_bucket(seqlen_q=8192, seqlen_k=8192, **{**base, "window_left": 4095, "softcap": 50.0})
    assert (w["mask"], w["window"], w["softcap"]) == ("window", 4096, True)
    full = attention_bucket(seqlen_q=1, seqlen_k=3, **{**base, "window_right": -1})
    assert (full["mask"], full["seqlen_q"], full["seqlen_k"]) == ("full", 16, 16)


def test_attention_kernels_are_declared():
    import tritium  # noqa: F401  (declares the kernels)

    for name in ("attention_fwd", "attention_bwd_dq", "attention_bwd_dkdv"):
        kernel = autotune.KERNELS[name]
        bucket = attention_bucket(head_dim=128, dtype=torch.bfloat16, seqlen_q=4096, seqlen_k=4096,
                                  window_left=-1, window_right=0, softcap=0.0, group=1)
        assert kernel.candidates(bucket), f"{name}: empty pruned space"
        assert len(kernel.source_hash) == 16


def test_export_ships_only_valid_entries(gpu_world, monkeypatch):
    kernel = toy_kernel()
    _tune_once(kernel)
    stale = {"config": {"BLOCK": 16, "num_warps": 4, "num_stages": 2}, "source": "old", "triton": "x", "ms": 1.0}
    store.write_entries(store.cache_path(SKU), SKU, {"toy": {"n=4,dtype=f16": stale}})
    autotune.reset()
    entries = autotune.valid_entries(SKU)
    assert list(entries["toy"]) == ["n=64,dtype=f16"]
    assert autotune.state()["kernels"]["toy"]["cache_entries"] == 2
