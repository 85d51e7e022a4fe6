"""A tunable kernel, declared as data, and the lookup every launch goes through.

Lookup order: override (tests) -> in-process memo -> the user's cache -> the table shipped
for this GPU -> tune, when asked and allowed -> heuristic default. A cached or shipped
entry counts only if it was tuned for this SKU (its file), this Triton version and this
kernel's source hash: editing a kernel, or a helper it calls, invalidates the entries of
the kernels built from that code alone. Its config must also be one the kernel may launch
for the bucket (`Kernel.config_problem`): anything else read from a file is dropped with
one warning, never launched.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect
import itertools
import json
import os
from collections import Counter
from typing import Callable, Iterator

from tritium.autotune import store, tuner
from tritium.autotune.config import Config
from tritium.autotune.device import Sku, current_sku
from tritium.runtime import capturing, interpreted

KERNELS: dict[str, "Kernel"] = {}
STATS: Counter = Counter()  # (kernel, source) -> resolutions, source in cache/table/tuned/default
_OVERRIDES: dict[str, Config] = {}
_TUNING: dict = {"enabled": os.environ.get("TRITIUM_AUTOTUNE", "0") == "1", "timer": tuner.gpu_timer}
_TABLES: dict[str, dict[str, dict]] = {}  # "cache"/"table" -> {kernel: {bucket: entry}}
TUNED: list[tuple[str, str, tuner.Result]] = []  # (kernel, bucket, result), this process


def _keep_all(config: Config, bucket: dict) -> bool:
    return True


class Kernel:
    """A Triton kernel's tuning declaration.

    space: candidates per meta-parameter, num_warps and num_stages included.
    key(**problem) -> bucket: a dict of JSON scalars; problems in one bucket share a config.
    default(**bucket) -> Config: the heuristic choice on a GPU.
    interpreter: the config under the Triton interpreter (never tuned).
    sources: the @triton.jit kernel (the root) and any functions it is built from, hashed
    for identity (`source_hash`: compiled, the helpers a root calls count without a listing).
    prune(config, bucket) -> bool: False for configs that cannot work (shared memory).
    """

    def __init__(self, name, *, space, key, default, interpreter, sources=(), prune=_keep_all):
        self.name, self.space, self.key, self.default = name, space, key, default
        self.interpreter, self.sources, self.prune = interpreter, tuple(sources), prune
        self._memo: dict[tuple, Config] = {}  # raw problem or bucket values -> config
        self.memo_hits = 0
        KERNELS[name] = self

    @functools.cached_property
    def source_hash(self) -> str:
        """16 hex digits naming the code of the kernel: Triton's `cache_key` of each compiled
        @triton.jit source, which hashes its text and, transitively, every @triton.jit
        function it calls (wherever defined) and the constexpr globals they read; so
        `sources` need only list the roots. It also holds the line each function starts on:
        an edit above one in its file retires the entries too (old, not wrong: retuned).
        Interpreted functions (and plain ones) have no cache_key: their own text is hashed,
        which is enough there, as the interpreter neither reads nor writes entries."""
        digest = hashlib.sha256()
        for fn in self.sources:
            digest.update(_source_key(fn).encode())
        return digest.hexdigest()[:16]

    def candidates(self, bucket: dict) -> list[Config]:
        """Every config of the space that the pruning predicate keeps for `bucket`."""
        names = [n for n in self.space if n not in ("num_warps", "num_stages")]
        configs = []
        for values in itertools.product(*(self.space[n] for n in names),
                                        self.space["num_warps"], self.space["num_stages"]):
            config = Config(dict(zip(names, values[:-2])), num_warps=values[-2], num_stages=values[-1])
            if self.prune(config, bucket):
                configs.append(config)
        return configs

    def lookup(self, launch: Callable[[Config], None] | None = None, **problem) -> Config:
        """The config for `problem`. launch(config) runs the kernel on the caller's real
        arguments (idempotently); it is used only when tuning is on and this is a miss."""
        if self.name in _OVERRIDES:
            return _OVERRIDES[self.name]
        if interpreted():
            return self.interpreter
        # Warm path: the raw problem (call sites pass it in a fixed order) is memoised too,
        # so a repeat call skips the key function.
        raw = tuple(problem.values())
        config = self._memo.get(raw)
        if config is not None:
            self.memo_hits += 1
            return config
        bucket = self.key(**problem)
        bucket_key = tuple(bucket.values())
        config = self._memo.get(bucket_key)
        if config is None:
            config = self._memo[bucket_key] = self._resolve(bucket, launch)
        else:
            self.memo_hits += 1
        self._memo[raw] = config
        return config

    def _resolve(self, bucket: dict, launch) -> Config:
        sku = active_sku()
        name = bucket_name(bucket)
        if sku is not None:
            for source, path in (("cache", store.cache_path(sku)), ("table", store.shipped_path(sku))):
                entry = tables(sku)[source].get(self.name, {}).get(name)
                config = self._from_file(entry, bucket, f"entry {self.name} [{name}] of {path}")
                if config is not None:
                    STATS[self.name, source] += 1
                    return config
        default = self.default(**bucket)
        if sku is not None and launch is not None and _TUNING["enabled"] and not capturing():
            result = tuner.search(self.candidates(bucket), launch, default, _TUNING["timer"])
            self._save(sku, name, result)
            STATS[self.name, "tuned"] += 1
            return result.config
        STATS[self.name, "default"] += 1
        return default

    def _from_file(self, entry, bucket: dict | None, where: str | None) -> Config | None:
        """The config of a cached or shipped `entry`, or None: when there is none, when it
        was tuned for other code (another source hash or Triton version: old, not wrong),
        or when it is not a config this kernel may launch for `bucket` (one warning naming
        `where`, unless that is None)."""
        import triton

        if entry is None:
            return None
        if not isinstance(entry, dict):
            problem = f"{_shown(entry)} is not an object"
        elif entry.get("source") != self.source_hash or entry.get("triton") != triton.__version__:
            return None
        else:
            problem = self.config_problem(entry.get("config"), bucket)
        if problem:
            if where is not None:
                store.warn_once(f"ignoring {where}: {problem}")
            return None
        return Config.from_json(entry["config"])

    def config_problem(self, data, bucket: dict | None) -> str:
        """Why `data` (a config as JSON, read from a file) must not be launched for `bucket`,
        "" when it may: it names every parameter of the space (num_warps and num_stages
        included) and no other, each value an int among that parameter's candidates, and
        the pruning rule keeps it for the bucket. The bucket's heuristic default is allowed
        as it is (the tuner saves it when it wins). With no bucket, only the space is checked."""
        if not isinstance(data, dict):
            return f"config {_shown(data)} is not an object"
        wrong = [f"{k}={_shown(v)}" for k, v in data.items() if type(v) is not int]
        if wrong:
            return f"{', '.join(wrong)}: not an integer"
        config = Config.from_json(data) if {"num_warps", "num_stages"} <= data.keys() else None
        if bucket is not None and config is not None and config == self.default(**bucket):
            return ""
        missing, unknown = sorted(self.space.keys() - data.keys()), sorted(data.keys() - self.space.keys())
        if missing or unknown:
            return f"parameters missing {missing}, unknown {unknown}; the space has {sorted(self.space)}"
        outside = [f"{k}={v} is not one of {self.space[k]}" for k, v in data.items() if v not in self.space[k]]
        if outside:
            return "; ".join(outside)
        if bucket is not None and not self.prune(config, bucket):
            return f"{config} is pruned for this bucket (cannot run there)"
        return ""

    def _save(self, sku: Sku, name: str, result: tuner.Result) -> None:
        import triton

        entry = {"config": result.config.to_json(), "source": self.source_hash, "triton": triton.__version__,
                 "ms": result.ms, "default_ms": result.default_ms}
        tables(sku)["cache"].setdefault(self.name, {})[name] = entry
        TUNED.append((self.name, name, result))
        store.write_entries(store.cache_path(sku), sku, {self.name: {name: entry}})


def state() -> dict:
    """What the autotune layer holds in this process: SKU, cache path, and per kernel its
    source hash, entries on disk, memo hits, how misses were resolved and the distinct
    configs launched."""
    sku = active_sku()
    loaded = tables(sku) if sku is not None else {"cache": {}, "table": {}}
    kernels = {}
    for name, kernel in sorted(KERNELS.items()):
        resolved = {source: STATS[name, source] for source in ("cache", "table", "tuned", "default")}
        configs = {json.dumps(c.to_json(), sort_keys=True): c.to_json() for c in kernel._memo.values()}
        kernels[name] = {
            "source": kernel.source_hash, "memo_hits": kernel.memo_hits, "resolved": resolved,
            "configs": list(configs.values()),
            "cache_entries": len(loaded["cache"].get(name, {})), "shipped_entries": len(loaded["table"].get(name, {})),
        }
    return {
        "sku": sku.to_json() if sku else None, "interpreted": interpreted(), "tuning": _TUNING["enabled"],
        "cache_path": str(store.cache_path(sku)) if sku else str(store.cache_dir()),
        "shipped_table": str(store.shipped_path(sku)) if sku else None, "kernels": kernels,
    }


def valid_entries(sku: Sku) -> dict[str, dict[str, dict]]:
    """The cached entries for `sku` that still match their kernel's source and this Triton,
    with a config in the kernel's space: what `tritium tune --export` ships."""
    cache = tables(sku)["cache"]
    return {
        name: {b: e for b, e in cache.get(name, {}).items() if kernel._from_file(e, None, None) is not None}
        for name, kernel in KERNELS.items() if cache.get(name)
    }


def _source_key(fn) -> str:
    """What identifies one of a kernel's `sources`: Triton's transitive cache_key for a
    compiled @triton.jit function (or a wrapper of one, e.g. an Autotuner's .fn), else the
    source text of the Python function (an InterpretedFunction's .fn, a plain function)."""
    from triton.runtime.jit import JITFunction

    while not isinstance(fn, JITFunction) and hasattr(fn, "fn"):
        fn = fn.fn
    if isinstance(fn, JITFunction):
        return "jit:" + fn.cache_key
    return "text:" + inspect.getsource(fn)


def _shown(value) -> str:
    """repr of a value read from a file, cut short for a warning."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def bucket_name(bucket: dict) -> str:
    """The human-readable JSON key of a bucket: "head_dim=128,dtype=bfloat16,..."."""
    return ",".join(f"{k}={v}" for k, v in bucket.items())


@functools.lru_cache(maxsize=None)
def active_sku() -> Sku | None:
    """The SKU entries are filed under for this process (the current CUDA device)."""
    return None if interpreted() else current_sku()


def tables(sku: Sku) -> dict[str, dict]:
    """The user's cache and the shipped table for `sku`, read once per process."""
    if not _TABLES:
        _TABLES["cache"] = store.read_table(store.cache_path(sku), sku)
        _TABLES["table"] = store.read_table(store.shipped_path(sku), sku)
    return _TABLES


def reset() -> None:
    """Forget memos and loaded tables (after the cache changed on disk, and in tests)."""
    _TABLES.clear()
    TUNED.clear()
    for kernel in KERNELS.values():
        kernel._memo.clear()
        kernel.memo_hits = 0
    active_sku.cache_clear()


@contextlib.contextmanager
def tuning(enabled: bool = True, timer: Callable | None = None) -> Iterator[None]:
    """Tune on misses inside the block (what TRITIUM_AUTOTUNE=1 does for a whole process);
    `timer(fn) -> ms` replaces the GPU timer (tests inject a fake one)."""
    previous = dict(_TUNING)
    _TUNING["enabled"] = enabled
    if timer is not None:
        _TUNING["timer"] = timer
    try:
        yield
    finally:
        _TUNING.update(previous)


@contextlib.contextmanager
def override(kernel: str, config: Config) -> Iterator[None]:
    """Force `config` for every launch of `kernel` inside the block (tests, experiments)."""
    previous = _OVERRIDES.get(kernel)
    _OVERRIDES[kernel] = config
    try:
        yield
    finally:
        if previous is None:
            del _OVERRIDES[kernel]
        else:
            _OVERRIDES[kernel] = previous
