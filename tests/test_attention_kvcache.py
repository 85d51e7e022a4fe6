"""flash_attention_with_kvcache against full attention over the same cache."""

import warnings

import pytest
import torch
from accuracy import assert_close
from conftest import DEVICE, DTYPES, ON_GPU, PADDED_HEAD_DIMS, nan_padded

import tritium
from tritium import reference


def make_cache(batch, max_seqlen, heads_kv, head_dim, dtype):
    return (torch.randn(batch, max_seqlen, heads_kv, head_dim, device=DEVICE, dtype=dtype) for _ in range(2))


def expected(q, k_cache, v_cache, lengths, opts):
    """Per sequence: (float64 truth, same-dtype reference) over its first lengths[b] keys."""
    truths, sames = [], []
    for b, n in enumerate(lengths):
        args = (q[b : b + 1], k_cache[b : b + 1, :n], v_cache[b : b + 1, :n])
        truths.append(reference.attention(*(x.double() for x in args), **opts))
        sames.append(reference.attention(*args, **opts))
    return torch.cat(truths), torch.cat(sames)


CASES = {
    "decode-gqa4": dict(seqlen_q=1, heads=(8, 2), new=True, splits=None),
    "decode-no-new-mqa": dict(seqlen_q=1, heads=(4, 1), new=False, splits=None),
    "decode-one-split": dict(seqlen_q=1, heads=(4, 4), new=True, splits=1),
    "chunk-window-softcap": dict(seqlen_q=5, heads=(4, 2), new=True, splits=3, window=(20, 0), softcap=30.0),
    "chunk-long-unpacked": dict(seqlen_q=40, heads=(4, 2), new=True, splits=2),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(CASES))
def test_kvcache_matches_full_attention(name, dtype):
    c = CASES[name]
    batch, max_seqlen, head_dim = 3, 190, 64
    heads_q, heads_kv = c["heads"]
    seqlen_q = c["seqlen_q"]
    k_cache, v_cache = make_cache(batch, max_seqlen, heads_kv, head_dim, dtype)
    cached = torch.tensor([0, 57, max_seqlen - seqlen_q], dtype=torch.int32, device=DEVICE)
    q = torch.randn(batch, seqlen_q, heads_q, head_dim, device=DEVICE, dtype=dtype)
    k_new = v_new = None
    if c["new"]:
        k_new, v_new = (torch.randn(batch, seqlen_q, heads_kv, head_dim, device=DEVICE, dtype=dtype) for _ in range(2))
    before = k_cache.clone(), v_cache.clone()
    opts = dict(causal=True, window_size=c.get("window", (-1, -1)), softcap=c.get("softcap", 0.0))
    out, lse = tritium.flash_attention_with_kvcache(
        q, k_cache, v_cache, cached, k=k_new, v=v_new, num_splits=c["splits"], return_lse=True, **opts
    )
    lengths = [int(n) + (seqlen_q if c["new"] else 0) for n in cached]
    if c["new"]:
        for b, n in enumerate(cached.tolist()):
            assert torch.equal(k_cache[b, n : n + seqlen_q], k_new[b])
            assert torch.equal(v_cache[b, n : n + seqlen_q], v_new[b])
            keep = torch.ones(max_seqlen, dtype=torch.bool, device=DEVICE)
            keep[n : n + seqlen_q] = False
            assert torch.equal(k_cache[b, keep], before[0][b, keep]), "rows outside the new tokens changed"
    else:
        assert torch.equal(k_cache, before[0]) and torch.equal(v_cache, before[1])
    truth, same = expected(q, k_cache, v_cache, lengths, opts)
    assert_close("out", out, same, truth, dtype)
    full = tritium.flash_attention(q[1:2], k_cache[1:2, : lengths[1]], v_cache[1:2, : lengths[1]], return_lse=True, **opts)
    assert torch.allclose(lse[1:2], full[1], atol=1e-4), "lse differs from the prefill kernel's"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("head_dim", (1, *PADDED_HEAD_DIMS))
def test_padded_head_dims(head_dim, dtype):
    """Append, packed split-KV forward and combine on head_dims padded to BLOCK_D. q and
    the caches are NaN past head_dim, so a load of a padded column shows in out; the new
    k/v are not, so an append that stored past head_dim would overwrite a NaN column."""
    batch, max_seqlen, heads_q, heads_kv, seqlen_new = 2, 80, 4, 2, 2
    k_cache, v_cache = (nan_padded((batch, max_seqlen, heads_kv, head_dim), dtype) for _ in range(2))
    q = nan_padded((batch, seqlen_new, heads_q, head_dim), dtype)
    k_new, v_new = (torch.randn(batch, seqlen_new, heads_kv, head_dim, device=DEVICE, dtype=dtype) for _ in range(2))
    cached = torch.tensor([5, 61], dtype=torch.int32, device=DEVICE)
    appended = [cache.clone() for cache in (k_cache, v_cache)]
    for b, n in enumerate(cached.tolist()):
        appended[0][b, n : n + seqlen_new], appended[1][b, n : n + seqlen_new] = k_new[b], v_new[b]
    out = tritium.flash_attention_with_kvcache(q, k_cache, v_cache, cached, k=k_new, v=v_new)
    assert torch.equal(k_cache, appended[0]) and torch.equal(v_cache, appended[1])
    assert all(cache._base[..., head_dim:].isnan().all() for cache in (k_cache, v_cache)), "a store strayed"
    truth, same = expected(q, k_cache, v_cache, (cached + seqlen_new).tolist(), dict(causal=True))
    assert_close("out", out, same, truth, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("seqlen_q,splits", [(1, None), (1, 1), (3, 2)])
def test_key_padding_mask_hides_cache_rows(seqlen_q, splits, dtype):
    """A left-padded batch: pad rows at the start of each sequence (and one hole) stay
    hidden, split boundaries included; rows past each length are hidden by cache_seqlens."""
    batch, max_seqlen, heads_q, heads_kv, head_dim = 3, 150, 4, 2, 48
    k_cache, v_cache = make_cache(batch, max_seqlen, heads_kv, head_dim, dtype)
    q = torch.randn(batch, seqlen_q, heads_q, head_dim, device=DEVICE, dtype=dtype)
    k_new, v_new = (torch.randn(batch, seqlen_q, heads_kv, head_dim, device=DEVICE, dtype=dtype) for _ in range(2))
    cached = torch.tensor([9, 140, 70], dtype=torch.int32, device=DEVICE)
    mask = torch.ones(batch, max_seqlen, dtype=torch.bool, device=DEVICE)
    mask[0, :5], mask[1, :77], mask[2, 30] = False, False, False
    out = tritium.flash_attention_with_kvcache(q, k_cache, v_cache, cached, k=k_new, v=v_new, key_padding_mask=mask,
                                               num_splits=splits, window_size=(50, 0), softcap=20.0)
    opts = dict(causal=True, window_size=(50, 0), softcap=20.0)
    truths, sames = [], []
    for b, n in enumerate((cached + seqlen_q).tolist()):
        args = (q[b : b + 1], k_cache[b : b + 1, :n], v_cache[b : b + 1, :n])
        truths.append(reference.attention(*(x.double() for x in args), key_padding_mask=mask[b : b + 1, :n], **opts))
        sames.append(reference.attention(*args, key_padding_mask=mask[b : b + 1, :n], **opts))
    assert_close("out", out, torch.cat(sames), torch.cat(truths), dtype)


def test_empty_cache_rows_give_zero():
    k_cache, v_cache = make_cache(2, 64, 2, 32, torch.float32)
    q = torch.randn(2, 1, 2, 32, device=DEVICE)
    out, lse = tritium.flash_attention_with_kvcache(q, k_cache, v_cache, 0, return_lse=True)
    assert torch.all(out == 0) and torch.all(lse == float("-inf"))


def test_int_cache_seqlens_and_splits_agree():
    k_cache, v_cache = make_cache(2, 128, 2, 32, torch.float32)
    q = torch.randn(2, 1, 4, 32, device=DEVICE)
    outs = [tritium.flash_attention_with_kvcache(q, k_cache, v_cache, 100, num_splits=s) for s in (1, 2, 5)]
    truth, same = expected(q, k_cache, v_cache, [100, 100], dict(causal=True))
    for out in outs:
        assert_close("out", out, same, truth, torch.float32)


def test_torch_compile_fullgraph():
    k_cache, v_cache = make_cache(2, 64, 2, 32, torch.float32)
    q = torch.randn(2, 1, 4, 32, device=DEVICE)
    k, v = (torch.randn(2, 1, 2, 32, device=DEVICE) for _ in range(2))
    seqlens = torch.tensor([3, 40], dtype=torch.int32, device=DEVICE)

    def step(q, k_cache, v_cache, seqlens, k, v):
        return tritium.flash_attention_with_kvcache(q, k_cache, v_cache, seqlens, k=k, v=v)

    caches = k_cache.clone(), v_cache.clone()
    out = torch.compile(step, fullgraph=True, backend="aot_eager")(q, *caches, seqlens, k, v)
    eager = step(q, k_cache, v_cache, seqlens, k, v)
    assert torch.allclose(out, eager) and torch.equal(caches[0], k_cache) and torch.equal(caches[1], v_cache)


@pytest.mark.gpu
def test_cuda_graph_capture():
    """Decode steps replayed from a CUDA graph: no host sync inside, cache advances."""
    assert ON_GPU
    batch, max_seqlen, heads_kv, head_dim = 2, 4096, 2, 128
    k_cache, v_cache = make_cache(batch, max_seqlen, heads_kv, head_dim, torch.bfloat16)
    q = torch.randn(batch, 1, 8, head_dim, device=DEVICE, dtype=torch.bfloat16)
    k, v = (torch.randn(batch, 1, heads_kv, head_dim, device=DEVICE, dtype=torch.bfloat16) for _ in range(2))
    seqlens = torch.tensor([100, 3000], dtype=torch.int32, device=DEVICE)
    step = lambda: tritium.flash_attention_with_kvcache(q, k_cache, v_cache, seqlens, k=k, v=v)  # noqa: E731
    step()  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    for _ in range(3):
        graph.replay()
        seqlens += 1
    torch.cuda.synchronize()
    lengths = [int(n) for n in seqlens]  # after three appends, the last at seqlens - 1
    truth, same = expected(q, k_cache, v_cache, lengths, dict(causal=True))
    assert_close("out", out, same, truth, torch.bfloat16)


# ---------------------------------------------------------- split-KV over the filled length


def split_keys(cache_seqlens, max_seqlen, num_splits, *, seqlen_new=0, heads=(8, 2), window=(-1, 0)):
    """Keys each split of the real split-KV launch attends to, (batch, num_splits): q = 0
    makes every visible key's score 0, so a split's partial lse is log(its key count)
    (-inf, i.e. 0 keys, for a split without work). Runs `launch_forward` as the KV-cache
    op does, on a cache whose rows up to the lengths are filled."""
    from tritium.kernels.attention import forward_config, launch_forward

    batch, (heads_q, heads_kv), head_dim = len(cache_seqlens), heads, 16
    seqlens = torch.tensor(cache_seqlens, dtype=torch.int32, device=DEVICE)
    k_cache, v_cache = make_cache(batch, max_seqlen, heads_kv, head_dim, torch.float32)
    q = torch.zeros(batch, 1, heads_q, head_dim, device=DEVICE)
    pack = heads_q // heads_kv
    window = dict(window_left=window[0], window_right=window[1], softcap=0.0)
    config = forward_config(q, k_cache, pack=pack, **window)
    out = torch.empty((num_splits, *q.shape), device=DEVICE)
    lse = torch.empty((num_splits, batch, heads_q, 1), device=DEVICE)
    launch_forward(q, k_cache, v_cache, out, lse, config, key_padding_mask=None, seqlens_k=seqlens,
                   seqlen_new=seqlen_new, scale=1.0, max_seqlen_k=max_seqlen, pack=pack, num_splits=num_splits,
                   **window)
    assert torch.equal(lse, lse[:, :, :1].expand_as(lse)), "the heads of a pack saw different keys"
    return lse[:, :, 0, 0].exp().round().long().T.tolist(), config.meta["BLOCK_N"]


def test_splits_follow_the_filled_length():
    """A short filled length in a long cache: every split gets an even share of the
    blocks the sequence needs (with the plan over the capacity, 1 of 4 had work)."""
    max_seqlen, splits = 4000, 4
    keys, block_n = split_keys([0, 1, 17, 300, 1000, max_seqlen - 1], max_seqlen, splits, seqlen_new=1)
    for length, per_split in zip((1, 2, 18, 301, 1001, max_seqlen), keys):
        assert sum(per_split) == length, per_split  # every key once
        blocks = -(-length // block_n)
        assert sum(n > 0 for n in per_split) == min(blocks, splits), (length, per_split)
        # whole blocks, the last one maybe partial: each split's share is the even one
        assert {-(-n // block_n) for n in per_split} <= {blocks // splits, -(-blocks // splits)}, per_split


def test_windowed_splits_cover_the_window_only():
    """Gemma 2's case, scaled: a 511-key window at the end of a 1000-key fill in a
    4000-row cache. The splits share the window's blocks (with the plan over the
    capacity, 2 of 8 had work)."""
    keys, block_n = split_keys([999, 3999, 5], 4000, 8, seqlen_new=1, heads=(4, 1), window=(511, 0))
    for length, per_split in zip((1000, 4000, 6), keys):
        assert sum(per_split) == min(length, 512), per_split
        first = max(length - 512, 0) // block_n * block_n  # the window's first block
        blocks = -(-(length - first) // block_n)
        assert sum(n > 0 for n in per_split) == min(blocks, 8), (length, per_split)


@pytest.mark.parametrize("window", [(-1, -1), (-1, 0), (20, 0), (3, 0)], ids=str)
@pytest.mark.parametrize("heads,seqlen_q", [((8, 2), 1), ((4, 1), 3), ((2, 2), 2)], ids=str)
@pytest.mark.parametrize("num_splits", [None, 3, 64])
def test_split_results_at_every_filled_length(num_splits, heads, seqlen_q, window):
    """Filled lengths 0, 1, 17 and full, with new tokens appended, GQA/MQA packs and
    windows; 64 splits leave most of them empty (written as lse -inf and merged away)."""
    batch, max_seqlen, head_dim = 4, 100, 32
    heads_q, heads_kv = heads
    k_cache, v_cache = make_cache(batch, max_seqlen, heads_kv, head_dim, torch.float32)
    q = torch.randn(batch, seqlen_q, heads_q, head_dim, device=DEVICE)
    k_new, v_new = (torch.randn(batch, seqlen_q, heads_kv, head_dim, device=DEVICE) for _ in range(2))
    cached = torch.tensor([0, 1, 17, max_seqlen - seqlen_q], dtype=torch.int64, device=DEVICE)
    opts = dict(causal=window[1] == 0, window_size=window if window[1] == 0 else (-1, -1))
    out, lse = tritium.flash_attention_with_kvcache(q, k_cache, v_cache, cached, k=k_new, v=v_new,
                                                    num_splits=num_splits, return_lse=True, **opts)
    lengths = (cached + seqlen_q).tolist()
    truth, same = expected(q, k_cache, v_cache, lengths, opts)
    assert_close("out", out, same, truth, torch.float32)
    for b, n in enumerate(lengths):
        full = tritium.flash_attention(q[b : b + 1], k_cache[b : b + 1, :n], v_cache[b : b + 1, :n], return_lse=True,
                                       **opts)
        assert torch.allclose(lse[b : b + 1], full[1], atol=1e-4), f"lse of sequence {b} (length {n})"


def test_no_keys_at_all_with_splits():
    """Filled length 0 and nothing appended: every split is empty."""
    k_cache, v_cache = make_cache(2, 300, 1, 16, torch.float32)
    q = torch.randn(2, 1, 4, 16, device=DEVICE)
    seqlens = torch.zeros(2, dtype=torch.int32, device=DEVICE)
    out, lse = tritium.flash_attention_with_kvcache(q, k_cache, v_cache, seqlens, num_splits=5, return_lse=True)
    assert torch.all(out == 0) and torch.all(lse == float("-inf"))


@pytest.mark.gpu
def test_eager_call_syncs_once():
    """An eager call with a tensor cache_seqlens reads the lengths once (its range check);
    with an int, never."""
    assert ON_GPU
    k_cache, v_cache = make_cache(2, 4096, 2, 128, torch.bfloat16)
    q = torch.randn(2, 1, 8, 128, device=DEVICE, dtype=torch.bfloat16)
    k, v = (torch.randn(2, 1, 2, 128, device=DEVICE, dtype=torch.bfloat16) for _ in range(2))
    seqlens = torch.tensor([100, 3000], dtype=torch.int32, device=DEVICE)
    for lengths, syncs in ((seqlens, 1), (100, 0)):
        tritium.flash_attention_with_kvcache(q, k_cache, v_cache, lengths, k=k, v=v)  # compile first
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                tritium.flash_attention_with_kvcache(q, k_cache, v_cache, lengths, k=k, v=v)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        found = [w for w in caught if "synchroniz" in str(w.message)]
        assert len(found) == syncs, [str(w.message) for w in found]


def test_split_count_is_capped_by_the_window():
    """The host plans from shapes alone: never more splits than blocks a tile's span can
    hold (the cache's, or a bounded window's, whatever the lengths on the device)."""
    from tritium.kernels.attention_kvcache import _split_count

    q = torch.empty(2, 1, 8, 64, device=DEVICE)
    assert _split_count(q, 2, 32768, 4, 64, 64, -1, 0) == 64
    assert _split_count(q, 2, 32768, 4, 64, 64, 100, 0) == 3  # 101 keys from anywhere in a block: 3 blocks
    assert _split_count(q, 2, 100, 4, 32, 64, -1, 0) == 4  # a 100-row cache has 4 blocks of 32
    assert _split_count(q, 2, 0, 4, 32, 5, -1, 0) == 1
