"""flash_attention_with_kvcache against full attention over the same cache."""

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
