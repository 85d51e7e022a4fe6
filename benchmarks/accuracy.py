"""When an error against the float64 reference is too large: FlashAttention's criterion,
the one rule of the tests (tests/accuracy.py) and of the benchmark rows.

A result may be at most FACTOR times as far from the float64 truth as PyTorch computing
the same op in the same dtype, plus a small absolute floor. In a benchmark run the
operator's `accuracy_reference` backend (eager PyTorch in the case's dtype) supplies that
error for every row of its case; where it has none (skipped, or its error not computed), a
per-dtype bound stands in. No triton here: tests/accuracy.py imports this module.
"""

from __future__ import annotations

import torch

from benchmarks.summary import is_subject

FACTOR = 2.0
# A result that is exact where PyTorch happens to be exact must not fail on one rounding:
# two units in the last place at 1.0 in half precision; in float32, room for a sum of
# thousands of terms taken in another order.
FLOOR = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
# With no measured same-dtype error, eight floors: in half precision one unit in the last
# place at 16 to 32, the largest values the suites return (gradients, softcapped logits).
BOUND = {dtype: 8 * floor for dtype, floor in FLOOR.items()}


def tolerance(dtype: torch.dtype, reference_err: float | None, factor: float = FACTOR) -> float:
    """The largest max abs error against float64 accepted for a result in `dtype`, given
    reference_err, PyTorch's own error in that dtype (None: not measured)."""
    if reference_err is None:
        return BOUND[dtype]
    return factor * reference_err + FLOOR[dtype]


def judge(rows: list[dict], reference: str) -> None:
    """Set "tolerance" and "accuracy_failed" on the rows of one (kernel, mode, case) whose
    error was computed, scaling from the row of backend `reference`. A NaN error fails."""
    reference_err = next((r["max_abs_err"] for r in rows if r["backend"] == reference), None)
    for row in rows:
        if row["max_abs_err"] is not None:
            row["tolerance"] = tolerance(getattr(torch, row["dtype"]), reference_err)
            row["accuracy_failed"] = not row["max_abs_err"] <= row["tolerance"]


def failures(rows: list[dict], subject_only: bool = False) -> list[dict]:
    """The rows judged over their tolerance (only tritium's with subject_only). Rows of
    results written before tolerances were recorded have no verdict and never fail."""
    return [r for r in rows if r.get("accuracy_failed") and (is_subject(r["backend"]) or not subject_only)]


def describe(row: dict) -> str:
    """One line naming a failed row, its error and its tolerance."""
    return (f"{row['kernel']} · {row['mode']} · {row['case']} · {row['backend']}: max abs error "
            f"{row['max_abs_err']:.3g} > tolerance {row['tolerance']:.3g} ({row['reproduce']})")
