"""Benchmark suites: each module registers its operators with `benchmarks.harness` on import."""

import importlib

NAMES = ("attention", "block_sparse", "hf", "mlp", "nf4", "norm", "rope")


def load(suite: str) -> None:
    """Import the suite `suite` (one of NAMES, or "all"), registering its operators."""
    for name in NAMES if suite == "all" else (suite,):
        importlib.import_module(f"benchmarks.suites.{name}")
