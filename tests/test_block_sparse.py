"""BigBird block-sparse attention against transformers' own module and a dense float64
reference that applies the same block layout, duplicates counted; the global blocks split
over several programs and merged, and the inverse lists of the dK/dV pass against a
brute-force inversion."""

import numpy as np
import pytest
import torch
from accuracy import assert_close
from conftest import DEVICE, DTYPES, nan_padded

import tritium
from tritium import reference
from tritium.kernels import block_sparse
from tritium.kernels.block_sparse import bigbird_random_layout, block_lists, block_sparse_attention, min_seqlen

BLOCK, RANDOM = 16, 1
SEQLEN = min_seqlen(BLOCK, RANDOM)  # 128: 8 blocks, the shortest sequence with a sparse layout


def transformers_module(heads=2, head_dim=16, seed=0):
    from transformers import BigBirdPegasusConfig
    from transformers.models.bigbird_pegasus.modeling_bigbird_pegasus import BigBirdPegasusBlockSparseAttention

    config = BigBirdPegasusConfig(d_model=heads * head_dim, encoder_attention_heads=heads, block_size=BLOCK,
                                  num_random_blocks=RANDOM, max_position_embeddings=1024, use_bias=False)
    config.hidden_size, config.num_attention_heads = config.d_model, heads
    return BigBirdPegasusBlockSparseAttention(config, seed=seed).to(DEVICE).eval()


def run_transformers(module, hidden, mask):
    from transformers.models.bigbird_pegasus.modeling_bigbird_pegasus import BigBirdPegasusEncoder

    blocked, band, from_mask, to_mask = BigBirdPegasusEncoder.create_masks_for_block_sparse_attn(mask.float(), BLOCK)
    with torch.no_grad():
        out, _ = module(hidden, band, from_mask, to_mask, blocked, blocked)
    return out


def run_tritium(module, hidden, mask, rand_attn=None):
    batch, seqlen, _ = hidden.shape
    heads, head_dim = module.num_attention_heads, module.attention_head_size
    q, k, v = (proj(hidden).view(batch, seqlen, heads, head_dim) for proj in (module.query, module.key, module.value))
    with torch.no_grad():
        out = block_sparse_attention(q, k, v, block_size=BLOCK, num_random_blocks=RANDOM, rand_attn=rand_attn,
                                     key_padding_mask=mask)
    return out.reshape(batch, seqlen, heads * head_dim)


def padding_mask(batch, seqlen):
    mask = torch.ones(batch, seqlen, dtype=torch.bool, device=DEVICE)
    mask[-1, seqlen - 37:] = False  # the last sequence is padded (a whole block and a part)
    return mask


def test_matches_transformers_eval_layout_with_padding():
    module = transformers_module()
    hidden = torch.randn(2, SEQLEN, module.all_head_size, device=DEVICE)
    for mask in (torch.ones(2, SEQLEN, dtype=torch.bool, device=DEVICE), padding_mask(2, SEQLEN)):
        ours, theirs = run_tritium(module, hidden, mask), run_transformers(module, hidden, mask)
        torch.testing.assert_close(ours, theirs, atol=2e-6, rtol=1e-5)


def test_matches_transformers_training_layout():
    """transformers draws its training layout with numpy from the module's seed: draw the
    same one, hand it to tritium, and compare with the module run in training mode."""
    module = transformers_module(seed=3)
    hidden = torch.randn(2, SEQLEN * 2, module.all_head_size, device=DEVICE)  # 16 blocks, room for randomness
    mask = padding_mask(2, SEQLEN * 2)
    np.random.seed(3)
    plan = module._get_rand_attn_plan(SEQLEN * 2, BLOCK, RANDOM)
    module.train()
    rand_attn = np.stack(module._bigbird_block_rand_mask_with_head(
        from_seq_length=SEQLEN * 2, to_seq_length=SEQLEN * 2, from_block_size=BLOCK, to_block_size=BLOCK,
        num_heads=2, plan_from_length=plan[0], plan_num_rand_blocks=plan[1]))
    assert rand_attn.any(), "the training layout should not be all zeros"
    theirs = run_transformers(module, hidden, mask)
    ours = run_tritium(module, hidden, mask, torch.tensor(rand_attn, device=DEVICE))
    torch.testing.assert_close(ours, theirs, atol=2e-6, rtol=1e-5)


def check_against_reference(q, k, v, rand_attn, mask, dout):
    dtype = q.dtype
    opts = dict(block_size=BLOCK, num_random_blocks=RANDOM, rand_attn=rand_attn, key_padding_mask=mask)
    out, lse = block_sparse_attention(q, k, v, return_lse=True, **opts)
    leaves64 = [x.detach().double().requires_grad_() for x in (q, k, v)]
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    truth, lse_truth = reference.block_sparse_attention(*leaves64, return_lse=True, **opts)
    same, lse_same = reference.block_sparse_attention(*leaves, return_lse=True, **opts)
    assert_close("out", out, same, truth, dtype)
    assert_close("lse", lse, lse_same, lse_truth, dtype)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    for name, g, s, t in zip(("dq", "dk", "dv"), grads, torch.autograd.grad(same, leaves, dout),
                             torch.autograd.grad(truth, leaves64, dout.double())):
        assert_close(name, g, s, t, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["eval", "random", "random-gqa-padded"])
def test_forward_backward_against_dense_reference(layout, dtype):
    heads_kv = 1 if layout.endswith("gqa-padded") else 2
    seqlen = SEQLEN + 2 * BLOCK
    q = torch.randn(2, seqlen, 2, 32, device=DEVICE, dtype=dtype, requires_grad=True)
    k, v = (torch.randn(2, seqlen, heads_kv, 32, device=DEVICE, dtype=dtype, requires_grad=True) for _ in range(2))
    generator = torch.Generator(device=DEVICE).manual_seed(1)
    rand_attn = None if layout == "eval" else bigbird_random_layout(seqlen, BLOCK, RANDOM, 2, generator=generator, device=DEVICE)
    mask = padding_mask(2, seqlen) if layout.endswith("padded") else None
    check_against_reference(q, k, v, rand_attn, mask, torch.randn(q.shape, device=DEVICE, dtype=dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("head_dim", [4, 12, 40, 160])
def test_padded_head_dims(head_dim, dtype, monkeypatch):
    """Forward, dQ and dK/dV on head_dims padded to BLOCK_D (a subset: the interpreter is
    slow here), global blocks split in 3 and merged. q, k, v and dout are NaN past
    head_dim: a load of a padded column shows."""
    monkeypatch.setattr(block_sparse, "split_blocks", lambda r: 3)
    q, k, v = (nan_padded((1, SEQLEN, 1, head_dim), dtype).requires_grad_() for _ in range(3))
    generator = torch.Generator(device=DEVICE).manual_seed(1)
    rand_attn = bigbird_random_layout(SEQLEN, BLOCK, RANDOM, 1, generator=generator, device=DEVICE)
    check_against_reference(q, k, v, rand_attn, padding_mask(1, SEQLEN), nan_padded(q.shape, dtype))


def test_noncontiguous_inputs_and_duplicates():
    """Transposed views; a layout listing the same random block twice counts it twice."""
    q, k, v = (torch.randn(1, 2, SEQLEN, 32, device=DEVICE).transpose(1, 2).requires_grad_() for _ in range(3))
    # Every middle row lists key block 5 at random: query blocks 4, 5 and 6 then list it twice
    # (once in their window), the others once.
    rand_attn = torch.full((2, SEQLEN // BLOCK - 2, RANDOM), 5, device=DEVICE)
    check_against_reference(q, k, v, rand_attn, padding_mask(1, SEQLEN), torch.randn(1, SEQLEN, 2, 32, device=DEVICE))


class Launches:
    """Stands in for a kernel in the module: records each launch's grid, then launches."""

    def __init__(self, kernel, grids):
        self.kernel, self.grids = kernel, grids

    def __getitem__(self, grid):
        self.grids.append(tuple(grid))
        return self.kernel[grid]


def record_launches(monkeypatch) -> dict:
    grids = {}
    for name in ("_bs_fwd_kernel", "_bs_bwd_dq_kernel", "_bs_bwd_dkdv_kernel", "_bs_merge_kernel"):
        grids[name] = []
        monkeypatch.setattr(block_sparse, name, Launches(getattr(block_sparse, name), grids[name]))
    return grids


@pytest.mark.parametrize(
    "num_blocks,chunk,layout",
    [
        (13, None, "random-padded"),  # split_blocks(1) = 12: 2 programs per global block, the last of 1 block
        (11, 3, "eval-gqa-padded"),  # 4 per global block; the middle rows' 6 blocks stay in one program
        (11, 3, "random-gqa"),
    ],
)
def test_global_blocks_split_and_merged(num_blocks, chunk, layout, monkeypatch):
    """Sequences of many blocks: the global query blocks (forward, dQ) and the global key
    blocks (dK/dV) are walked by several programs of at most split_blocks key (query)
    blocks each, launched first, and merged; outputs, lse and gradients are the
    reference's. Eval layouts (block 0 counted r + 1 times), random ones, GQA, padding."""
    if chunk is not None:
        monkeypatch.setattr(block_sparse, "split_blocks", lambda r: chunk)
    chunk = block_sparse.split_blocks(RANDOM)
    grids = record_launches(monkeypatch)
    seqlen, heads_kv = num_blocks * BLOCK, 1 if "gqa" in layout else 2
    q = torch.randn(2, seqlen, 2, 16, device=DEVICE, requires_grad=True)
    k, v = (torch.randn(2, seqlen, heads_kv, 16, device=DEVICE, requires_grad=True) for _ in range(2))
    generator = torch.Generator(device=DEVICE).manual_seed(2)
    rand_attn = (None if layout.startswith("eval")
                 else bigbird_random_layout(seqlen, BLOCK, RANDOM, 2, generator=generator, device=DEVICE))
    mask = padding_mask(2, seqlen) if "padded" in layout else None
    check_against_reference(q, k, v, rand_attn, mask, torch.randn(q.shape, device=DEVICE))
    splits = -(-num_blocks // chunk)
    assert splits > 1
    programs = num_blocks - 2 + 2 * splits  # was num_blocks, the global ones walking every block
    assert grids["_bs_fwd_kernel"] == [(programs, 4)]
    assert grids["_bs_bwd_dq_kernel"] == [(programs, 4)]
    assert grids["_bs_bwd_dkdv_kernel"] == [(programs, 2 * heads_kv)]
    assert [grid[1:] for grid in grids["_bs_merge_kernel"]] == [(4, 1), (4, 1), (2 * heads_kv, 2)]


def test_short_sequences_are_not_split(monkeypatch):
    """8 blocks fit in one program of split_blocks(1) = 12: nothing to merge."""
    grids = record_launches(monkeypatch)
    q, k, v = (torch.randn(1, SEQLEN, 1, 16, device=DEVICE, requires_grad=True) for _ in range(3))
    check_against_reference(q, k, v, None, padding_mask(1, SEQLEN), torch.randn(q.shape, device=DEVICE))
    assert grids["_bs_fwd_kernel"] == grids["_bs_bwd_dq_kernel"] == grids["_bs_bwd_dkdv_kernel"] == [(8, 1)]
    assert grids["_bs_merge_kernel"] == []


def test_out_of_range_ignored_with_split_global_blocks(monkeypatch):
    """tests/test_memory_safety_sparse_nf4.py's compiled case with the global blocks split:
    on fenced inputs, rand_attn indices outside [0, num_blocks) (which only torch.compile
    lets through) are ignored by the forward, the merge and both backward kernels (the
    inverse lists leave them out), and nothing is read or written past a tensor."""
    from test_memory_safety_sparse_nf4 import attend, check_attention, out_of_range_layout

    monkeypatch.setattr(block_sparse, "split_blocks", lambda r: 3)
    torch._dynamo.reset()
    check_attention(torch.compile(attend, fullgraph=True, backend="aot_eager"), out_of_range_layout(), monkeypatch,
                    mask_view="strided")


def brute_force_inverse(lists: torch.Tensor, counts: torch.Tensor) -> list:
    """inverse[h][j]: [(query block, times it lists key block j)] in query-block order, by
    reading every slot of every list of block_lists (skipped entries left out)."""
    heads, num_blocks, width = lists.shape
    inverse = [[{} for _ in range(num_blocks)] for _ in range(heads)]
    for h in range(heads):
        for i in range(num_blocks):
            for slot in range(min(int(counts[i]), width)):
                j = int(lists[h, i, slot])
                if 0 <= j < num_blocks:
                    inverse[h][j][i] = inverse[h][j].get(i, 0) + 1
    return [[sorted(row.items()) for row in head] for head in inverse]


def layout_for(kind: str, num_blocks: int, r: int, heads: int = 3) -> torch.Tensor:
    generator = torch.Generator(device=DEVICE).manual_seed(num_blocks * 10 + r)
    rand_attn = bigbird_random_layout(num_blocks * BLOCK, BLOCK, r, heads, generator=generator, device=DEVICE)
    if kind == "eval" or not r:
        return torch.zeros_like(rand_attn)
    if kind == "duplicates":  # every row lists block 3 r times: rows 2, 3, 4 once more in their window
        return torch.full_like(rand_attn, 3)
    if kind == "out-of-range":  # ignored: past the end, before the start, 3 once truncated to 32 bits
        rand_attn[0, 1, 0], rand_attn[1, 2, -1], rand_attn[2, 0, 0] = num_blocks + 4, -1, 2**32 + 3
        rand_attn[1, -1, 0] = num_blocks
    return rand_attn


@pytest.mark.parametrize("num_blocks,r", [(8, 1), (13, 3), (40, 2), (9, 0)])
@pytest.mark.parametrize("kind", ["eval", "random", "duplicates", "out-of-range"])
def test_inverse_lists_against_brute_force(kind, num_blocks, r):
    """For each head and key block: the query blocks whose lists hold it, each once and in
    order, with the number of times it is listed (the eval layout's block 0: r + 1 times
    by every middle row); entries outside [0, num_blocks) left out; the global key blocks
    listed by every query block."""
    from tritium.kernels.block_sparse import inverse_lists

    rand_attn = layout_for(kind, num_blocks, r)
    offsets, entries = inverse_lists(num_blocks, rand_attn)
    heads = rand_attn.shape[0]
    capacity = 2 * num_blocks + (num_blocks - 2) * (5 + r)
    assert offsets.dtype == entries.dtype == torch.int32
    assert offsets.shape == (heads, num_blocks + 1) and entries.shape == (heads, 2, capacity)
    assert (offsets[:, 0] == 0).all() and (offsets.diff(dim=1) >= 0).all() and (offsets[:, -1] <= capacity).all()
    expected = brute_force_inverse(*block_lists(num_blocks, rand_attn))
    if kind != "out-of-range":
        counts = reference.bigbird_block_counts(num_blocks, rand_attn)
        assert expected == [[[(i, int(counts[h, i, j])) for i in range(num_blocks) if counts[h, i, j]]
                             for j in range(num_blocks)] for h in range(heads)]
    for h in range(heads):
        for j in range(num_blocks):
            lo, hi = offsets[h, j].item(), offsets[h, j + 1].item()
            assert list(zip(entries[h, 0, lo:hi].tolist(), entries[h, 1, lo:hi].tolist())) == expected[h][j], (h, j)
        assert offsets[h, 1] - offsets[h, 0] == offsets[h, -1] - offsets[h, -2] == num_blocks
    if kind == "eval":
        assert entries[0, 1, 1: num_blocks - 1].tolist() == [r + 1] * (num_blocks - 2)


def test_inverse_lists_compile_without_host_reads():
    """Built by tensor ops alone: traced whole (fullgraph) for a training layout, the same
    as eagerly; and built on the meta device, where a value read would fail."""
    from tritium.kernels.block_sparse import inverse_lists

    rand_attn = layout_for("out-of-range", 13, 3)
    torch._dynamo.reset()
    compiled = torch.compile(inverse_lists, fullgraph=True, backend="aot_eager")
    for got, want in zip(compiled(13, rand_attn), inverse_lists(13, rand_attn)):
        assert torch.equal(got, want)
    offsets, entries = inverse_lists(13, rand_attn.to("meta"))
    assert offsets.shape == (3, 14) and entries.shape == (3, 2, 2 * 13 + 11 * 8)


def test_random_layout_respects_transformers_candidates():
    seqlen, heads, r = 32 * BLOCK, 4, 3
    generator = torch.Generator(device=DEVICE).manual_seed(0)
    layout = bigbird_random_layout(seqlen, BLOCK, r, heads, generator=generator, device=DEVICE)
    again = bigbird_random_layout(seqlen, BLOCK, r, heads, generator=torch.Generator(device=DEVICE).manual_seed(0),
                                  device=DEVICE)
    assert torch.equal(layout, again) and layout.shape == (heads, 30, r)
    last = seqlen // BLOCK - 1
    for row in range(layout.shape[1]):
        i = row + 1
        for h in range(heads):
            picked = layout[h, row].tolist()
            assert len(set(picked)) == r and all(1 <= j < last for j in picked)
            if i == 1:
                assert min(picked) >= 3
            elif i == 2:
                assert min(picked) >= 4
            elif i < last - 2:
                assert all(abs(j - i) >= 2 for j in picked)


def test_eval_layout_is_all_zeros():
    q, k, v = (torch.randn(1, SEQLEN, 2, 16, device=DEVICE) for _ in range(3))
    zeros = torch.zeros(2, SEQLEN // BLOCK - 2, RANDOM, dtype=torch.long, device=DEVICE)
    kwargs = dict(block_size=BLOCK, num_random_blocks=RANDOM)
    assert torch.equal(block_sparse_attention(q, k, v, **kwargs), block_sparse_attention(q, k, v, rand_attn=zeros, **kwargs))


@pytest.mark.parametrize(
    "changes,error,words",
    [
        (dict(seqlen=SEQLEN + 5), ValueError, "not a multiple of block_size 16"),
        (dict(seqlen=SEQLEN - BLOCK), ValueError, "too short for the block-sparse layout"),
        (dict(block_size=24), ValueError, "block_size: expected a power of two >= 16"),
        (dict(rand_attn=torch.zeros(2, 5, RANDOM, dtype=torch.long)), ValueError, "rand_attn: expected shape"),
        (dict(rand_attn=torch.full((2, 6, RANDOM), 8)), ValueError, "rand_attn: block indices must lie in [0, 7]"),
        (dict(rand_attn=torch.zeros(2, 6, RANDOM)), TypeError, "rand_attn: expected dtype int32, int64"),
        (dict(key_padding_mask=torch.ones(1, SEQLEN)), TypeError, "key_padding_mask: expected dtype bool"),
        (dict(kv_seqlen=SEQLEN + BLOCK), ValueError, "block-sparse attention is self-attention"),
    ],
)
def test_errors(changes, error, words):
    seqlen = changes.pop("seqlen", SEQLEN)
    q = torch.randn(1, seqlen, 2, 16, device=DEVICE)
    k = v = torch.randn(1, changes.pop("kv_seqlen", seqlen), 2, 16, device=DEVICE)
    kwargs = dict(block_size=BLOCK, num_random_blocks=RANDOM)
    kwargs.update({n: x.to(DEVICE) if isinstance(x, torch.Tensor) else x for n, x in changes.items()})
    with pytest.raises(error) as info:
        block_sparse_attention(q, k, v, **kwargs)
    assert words in str(info.value)
    if "too short" in words:
        assert f"minimum {SEQLEN}" in str(info.value) and "flash_attention" in str(info.value)


@pytest.mark.parametrize("layout", ["eval", "random-split"])
def test_torch_compile_fullgraph(layout, monkeypatch):
    """Compiled whole, forward and backward, as eagerly: the eval layout (cached), and a
    training layout (its lists and inverse lists built in the graph) with global blocks
    split over programs."""
    seqlen, rand_attn = SEQLEN, None
    if layout == "random-split":
        monkeypatch.setattr(block_sparse, "split_blocks", lambda r: 3)
        seqlen = SEQLEN + 2 * BLOCK
        generator = torch.Generator(device=DEVICE).manual_seed(4)
        rand_attn = bigbird_random_layout(seqlen, BLOCK, RANDOM, 2, generator=generator, device=DEVICE)
    q, k, v = (torch.randn(1, seqlen, 2, 16, device=DEVICE, requires_grad=True) for _ in range(3))

    def step(q, k, v):
        return tritium.block_sparse_attention(q, k, v, block_size=BLOCK, num_random_blocks=RANDOM,
                                              rand_attn=rand_attn).square().sum()

    torch._dynamo.reset()
    loss = torch.compile(step, fullgraph=True, backend="aot_eager")(q, k, v)
    grads = torch.autograd.grad(loss, (q, k, v))
    eager = torch.autograd.grad(step(q, k, v), (q, k, v))
    assert all(torch.allclose(a, b) for a, b in zip(grads, eager))
