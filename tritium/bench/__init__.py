"""What tritium measures, as data: each suite module registers its operators (cases,
inputs, backends, FLOP and byte counts, error against float64) with
`tritium.bench.operators` when imported. `tritium profile` runs one case of it; the
repository's benchmarks/ harness times every backend of every case and writes reports.

A suite imports triton (through tritium): import one only once TRITON_INTERPRET is settled.
"""

import importlib

NAMES = ("attention", "block_sparse", "hf", "loss", "mlp", "models", "nf4", "norm", "rope")


def load(suite: str) -> None:
    """Import the suite `suite` (one of NAMES, or "all"), registering its operators."""
    for name in NAMES if suite == "all" else (suite,):
        importlib.import_module(f"tritium.bench.{name}")
