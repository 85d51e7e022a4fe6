"""Heaviest-first launch order of the attention kernels (issue 15, item 6): the forward and
dQ kernels map program ids to query tiles, and the dK/dV kernel to key tiles, through
`online_softmax.heaviest_first` (in the order `heavier_later` picks from the window, as
their launchers call it), so that under causal masks the tiles with the most work
start first and the light ones form the tail. The order must be a permutation and must
not change a result."""

import pytest
import torch
import triton
import triton.language as tl
from conftest import DEVICE
from test_attention import Case, check_against_reference, make_inputs, options

from tritium import autotune
from tritium.kernels.online_softmax import block_span, heavier_later, heaviest_first, window_reach


@triton.jit
def _order_kernel(Tile, Blocks, length, other, offset, reach_lo, reach_hi, TILE: tl.constexpr, BLOCK: tl.constexpr,
                  REVERSE: tl.constexpr):
    """What program pid of an attention kernel takes: its tile along an axis of `length`
    (query tiles: the forward, dQ; key tiles: dK/dV), and how many blocks of the other
    axis that tile visits, from the kernels' own helpers. offset: the position shift
    between the axes (seqlen_k - seqlen_q for query tiles, its negation for key tiles)."""
    pid = tl.program_id(0)
    tile = heaviest_first(pid, tl.num_programs(0), REVERSE)
    first = tile * TILE + offset
    last = tl.minimum((tile + 1) * TILE, length) - 1 + offset
    lo, _, _, hi = block_span(first, last, reach_lo, reach_hi, other, BLOCK)
    tl.store(Tile + pid, tile)
    tl.store(Blocks + pid, (hi - lo + BLOCK - 1) // BLOCK)


def launch_order(kind, seqlen_q, seqlen_k, window, tile=16, block=16):
    """(tiles, blocks visited) in program order for the kernel `kind` ("query": forward
    and dQ; "key": dK/dV), with the window as the launchers pass it (-1 = unbounded)."""
    shift = seqlen_k - seqlen_q
    if kind == "query":
        length, other, offset, sides = seqlen_q, seqlen_k, shift, window
    else:  # the queries that see key j are [j - right, j + left]
        length, other, offset, sides = seqlen_k, seqlen_q, -shift, window[::-1]
    reaches = [window_reach(w, seqlen_q + seqlen_k + 1) for w in sides]
    count = triton.cdiv(length, tile)
    tiles = torch.full((count,), -1, dtype=torch.int32, device=DEVICE)
    blocks = torch.full((count,), -1, dtype=torch.int32, device=DEVICE)
    _order_kernel[(count,)](tiles, blocks, length, other, offset, *reaches, TILE=tile, BLOCK=block,
                            REVERSE=heavier_later(*sides))
    return tiles.tolist(), blocks.tolist()


ORDER_CASES = {
    # kind, seqlen_q, seqlen_k, window, reversed
    "causal-query": ("query", 113, 113, (-1, 0), True),
    "causal-query-q<k": ("query", 50, 113, (-1, 0), True),
    "causal-query-q>k": ("query", 113, 50, (-1, 0), True),
    "sliding-causal-query": ("query", 113, 200, (30, 0), True),
    "causal-key": ("key", 113, 113, (-1, 0), False),
    "causal-key-q<k": ("key", 50, 113, (-1, 0), False),
    "sliding-causal-key": ("key", 200, 113, (30, 0), False),
    "dense-query": ("query", 113, 70, (-1, -1), False),
    "dense-key": ("key", 113, 70, (-1, -1), False),
    "left-window-right-unbounded-key": ("key", 70, 113, (20, -1), True),
    "right-only-query": ("query", 70, 113, (-1, 5), True),
    "one-tile": ("query", 7, 7, (-1, 0), True),
}


@pytest.mark.parametrize("name", list(ORDER_CASES))
def test_order_is_a_permutation_heaviest_first(name):
    kind, seqlen_q, seqlen_k, window, reverse = ORDER_CASES[name]
    tiles, blocks = launch_order(kind, seqlen_q, seqlen_k, window)
    count = len(tiles)
    assert sorted(tiles) == list(range(count)), f"not every tile exactly once: {tiles}"
    assert tiles == (list(range(count))[::-1] if reverse else list(range(count)))
    # Heaviest first: the first program has the most work (blocks of the other axis
    # visited) and the last the least, and the work never grows along the launch order,
    # each up to the one block that a tile's alignment (or a last, partial tile) can add.
    assert blocks[0] >= max(blocks) - 1 and blocks[-1] <= min(blocks) + 1, blocks
    assert all(b <= a + 1 for a, b in zip(blocks, blocks[1:])), blocks


def test_causal_order_matters_here():
    """The shapes below do weigh their tiles unevenly: launched in id order, causal query
    tiles would go lightest first (so the order tests above test something)."""
    _, blocks = launch_order("query", 113, 113, (-1, 0))
    assert blocks == sorted(blocks, reverse=True) and blocks[0] > blocks[-1]


RESULT_CASES = {
    "causal-113": Case(seqlen_q=113, seqlen_k=113, causal=True, heads_q=2, heads_kv=1),
    "causal-q<k": Case(seqlen_q=50, seqlen_k=113, causal=True, heads_q=4, heads_kv=2, head_dim=32),
    "causal-q>k": Case(seqlen_q=113, seqlen_k=50, causal=True, head_dim=32),
    "sliding-causal-softcap": Case(seqlen_q=113, seqlen_k=150, causal=True, window=(30, 0), softcap=20.0, head_dim=32),
    "left-window-only": Case(seqlen_q=70, seqlen_k=113, window=(20, -1), head_dim=32, mask="random"),
    "right-window-only": Case(seqlen_q=113, seqlen_k=70, window=(-1, 5), head_dim=32),
}


@pytest.mark.parametrize("name", list(RESULT_CASES))
def test_results_and_gradients_unchanged(name):
    """Forward, lse and gradients against the float64 reference with 16-row and 16-key
    tiles, so that every kernel has several tiles to order (113 = 7 x 16 + 1)."""
    config = autotune.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=4, num_stages=1)
    case = RESULT_CASES[name]
    q, k, v, mask = make_inputs(case, torch.float32)
    dout = torch.randn(q.shape, device=DEVICE)
    with autotune.override("attention_fwd", config), autotune.override("attention_bwd_dq", config), \
            autotune.override("attention_bwd_dkdv", config):
        check_against_reference(q, k, v, mask, options(case), dout)
