"""BigBird-Pegasus' training-mode random blocks, drawn as transformers draws them.

In training, transformers' BigBirdPegasusBlockSparseAttention seeds numpy's legacy global
generator with the encoder layer's index before every forward and draws each head's random
key blocks with `np.random.permutation`. The layout is therefore a fixed function of (layer,
sequence length, block size, r, heads, max_position_embeddings): we draw it with our own
`RandomState` in the same order, once, and cache it.

Two rules, as transformers has them (both keep the paper's quirks):
- sequence lengths 1024, 3072 and 4096 ("the paper's plans"): each head draws a whole
  max_position_embeddings-long layout whose random blocks lie in the first 1024 tokens
  (outside the row's window and the edge blocks), and keeps its first rows;
- any other length longer than (5 + 2r) blocks: every row picks r blocks from the first
  2r + 5, avoiding its own window, the first and the (2r + 5)-th block, and for rows 1 and
  2r + 3 one more block each; rows draw in order, heads within a row.

Shorter inputs never run block-sparse (the encoder switches to full attention).
"""

from __future__ import annotations

import functools

import numpy as np
import torch

PAPER_LENGTHS = (1024, 3072, 4096)


def random_layout(seqlen: int, *, block_size: int, num_random_blocks: int, heads: int, seed: int,
                  max_seqlen: int) -> torch.Tensor:
    """rand_attn (heads, seqlen / block_size - 2, num_random_blocks) int64 on the CPU, the
    random key blocks of each middle query block for tritium.block_sparse_attention, equal to
    transformers' training layout for the encoder layer `seed`. Read-only: cached."""
    return _layout(seqlen, block_size, num_random_blocks, heads, seed, max_seqlen)


@functools.lru_cache(maxsize=256)
def _layout(seqlen: int, size: int, r: int, heads: int, seed: int, max_seqlen: int) -> torch.Tensor:
    blocks = seqlen // size
    if seqlen % size or blocks <= 2 * r + 5:
        raise ValueError(f"BigBird random layout: seqlen must be a multiple of block_size ({size}) longer than "
                         f"(5 + 2 * num_random_blocks) blocks ({(2 * r + 5) * size} tokens), got {seqlen}")
    rng = np.random.RandomState(seed)
    layout = np.zeros((heads, blocks - 2, r), dtype=np.int64)
    if r == 0:
        return torch.from_numpy(layout)
    if seqlen in PAPER_LENGTHS:
        for head in range(heads):
            layout[head] = _paper_rows(rng, max_seqlen // size, 1024 // size - 1 if 1024 > 2 * size else None, r)[
                : blocks - 2]
    else:
        end = 2 * r + 5
        for row in range(1, blocks - 1):
            for head in range(heads):
                layout[head, row - 1] = _pick(rng, np.arange(end, dtype=np.int32), r, _excluded(row, end))
    return torch.from_numpy(layout)


def _excluded(row: int, end: int) -> set[int]:
    """The blocks row may not pick from [0, end): its window, the two edge blocks, and the
    block that would duplicate a global one for the second and second-to-last rows."""
    out = {row - 1, row, row + 1, 0, end - 1}
    if row == 1:
        out.add(end - 2)
    if row == end - 2:
        out.add(1)
    return out


def _pick(rng: np.random.RandomState, candidates: np.ndarray, r: int, excluded=frozenset()) -> np.ndarray:
    """The first r of a permutation of candidates that are not excluded."""
    picked = [int(b) for b in rng.permutation(candidates) if int(b) not in excluded][:r]
    if len(picked) < r:
        raise ValueError(f"BigBird random layout: only {len(picked)} blocks to pick {r} random ones from "
                         "(block_size too large for this sequence length)")
    return np.asarray(picked)


def _paper_rows(rng: np.random.RandomState, blocks: int, last: int | None, r: int) -> np.ndarray:
    """One head's (blocks - 2, r) layout of the paper's plans: middle blocks 1..blocks-2, row i
    picking outside its window [i-1, i+1] among blocks 1..last (last = blocks - 1 unless given)."""
    middle = np.arange(1, blocks - 1, dtype=np.int32)
    last = blocks - 1 if last is None else last
    rows = np.zeros((blocks - 2, r), dtype=np.int64)
    for i in range(1, blocks - 1):
        if i in (1, 2):
            candidates = middle[i + 1:last]
        elif i >= blocks - 3:  # the paper's code leaves the window in for the last two rows
            candidates = middle[:last]
        elif i - 2 > last:
            candidates = middle[:last]
        elif i + 1 == last:
            candidates = middle[:i - 2]
        else:
            candidates = np.concatenate((middle[:i - 2], middle[i + 1:last]))
        rows[i - 1] = _pick(rng, candidates, r)
    return rows
