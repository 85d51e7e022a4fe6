"""Per-GPU autotuning: config spaces declared as data, a persistent per-SKU cache, tables
shipped with tritium, and heuristic defaults.

Every kernel declares a `Kernel` (its space, key function, default and sources) and calls
`KERNEL.lookup(launch, **problem)` before launching. Under the interpreter or on CPU the
interpreter config is used: no tuning, no warnings. Tuning happens on a miss only when
asked: TRITIUM_AUTOTUNE=1, `with tuning():`, or `tritium tune`.
"""

from tritium.autotune.config import Config
from tritium.autotune.kernel import (
    KERNELS,
    STATS,
    TUNED,
    Kernel,
    active_sku,
    bucket_name,
    override,
    reset,
    state,
    tuning,
    valid_entries,
)
from tritium.autotune.store import cache_dir, cache_path, shipped_path

__all__ = [
    "Config", "KERNELS", "STATS", "Kernel", "active_sku", "bucket_name", "cache_dir", "cache_path",
    "override", "reset", "shipped_path", "state", "tuning", "TUNED", "valid_entries",
]
