"""Bad input raises a clear error naming the argument, before any launch, changing nothing."""

import pytest
import torch
from conftest import DEVICE, ON_GPU

import tritium
import tritium.runtime


def qkv(b=2, sq=8, sk=8, hq=4, hk=2, d=32, dtype=torch.float32):
    return (
        torch.randn(b, sq, hq, d, device=DEVICE, dtype=dtype),
        torch.randn(b, sk, hk, d, device=DEVICE, dtype=dtype),
        torch.randn(b, sk, hk, d, device=DEVICE, dtype=dtype),
    )


def call(**changes):
    q, k, v = qkv()
    args = dict(q=q, k=k, v=v)
    args.update(changes)
    return tritium.flash_attention(args.pop("q"), args.pop("k"), args.pop("v"), **args)


@pytest.mark.parametrize(
    "changes,error,words",
    [
        (dict(q=[1.0]), TypeError, "q: expected a torch.Tensor"),
        (dict(q=torch.randn(2, 8, 32)), ValueError, "q: expected a 4-d tensor"),
        (dict(q=torch.ones(2, 8, 4, 32, dtype=torch.int32)), TypeError, "q: expected dtype"),
        (dict(k=torch.randn(2, 8, 2, 32, dtype=torch.float16)), TypeError, "k: dtype torch.float16 differs from q"),
        (dict(k=torch.randn(3, 8, 2, 32)), ValueError, "k: expected batch"),
        (dict(k=torch.randn(2, 8, 2, 64)), ValueError, "k: expected head_dim"),
        (dict(v=torch.randn(2, 9, 2, 32)), ValueError, "v: shape (2, 9, 2, 32) must equal k's"),
        (dict(k=torch.randn(2, 8, 3, 32), v=torch.randn(2, 8, 3, 32)), ValueError, "heads_kv = 3 must divide"),
        (dict(window_size=(-2, 0)), ValueError, "window_size"),
        (dict(window_size=(4,)), ValueError, "window_size"),
        (dict(window_size=(1.5, 0)), ValueError, "window_size"),
        (dict(causal=True, window_size=(4, 2)), ValueError, "causal=True needs a right window of 0"),
        (dict(causal=1), TypeError, "causal: expected bool"),
        (dict(softcap=-1.0), ValueError, "softcap"),
        (dict(softcap=float("nan")), ValueError, "softcap"),
        (dict(softmax_scale=0.0), ValueError, "softmax_scale"),
        (dict(key_padding_mask=torch.ones(2, 8)), TypeError, "key_padding_mask: expected dtype bool"),
        (dict(key_padding_mask=torch.ones(2, 9, dtype=torch.bool)), ValueError, "key_padding_mask: expected shape"),
    ],
)
def test_flash_attention_errors(changes, error, words):
    for name in ("q", "k", "v"):
        if isinstance(changes.get(name), torch.Tensor):
            changes[name] = changes[name].to(DEVICE)
    if isinstance(changes.get("key_padding_mask"), torch.Tensor):
        changes["key_padding_mask"] = changes["key_padding_mask"].to(DEVICE)
    with pytest.raises(error) as info:
        call(**changes)
    assert words in str(info.value)


ATTENTION_OPS = {
    "flash_attention": tritium.flash_attention,
    "kvcache": lambda q, k, v: tritium.flash_attention_with_kvcache(q, k, v, 0),
    "block_sparse": lambda q, k, v: tritium.block_sparse_attention(q, k, v, block_size=16, num_random_blocks=1),
}


@pytest.mark.parametrize("op", list(ATTENTION_OPS))
@pytest.mark.parametrize("head_dim", [0, 257])
def test_head_dim_out_of_range(head_dim, op):
    q, k, v = qkv(d=head_dim)
    with pytest.raises(ValueError, match=r"q: head_dim must be in \[1, 256\], got " + str(head_dim)):
        ATTENTION_OPS[op](q, k, v)


@pytest.mark.parametrize("head_dim", [1, 2, 3, 17, 255, 256])
def test_head_dim_in_range(head_dim):
    q, k, v = qkv(b=1, sq=3, sk=5, d=head_dim)
    out = tritium.flash_attention(q, k, v, causal=True)
    assert out.shape == q.shape and torch.isfinite(out).all()


def test_wrong_device_type():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="k: tensor is on meta"):
        tritium.flash_attention(q, k.to("meta"), v)


@pytest.mark.skipif(ON_GPU, reason="CPU tensors: the interpreter-mode check")
def test_cpu_tensors_outside_interpreter(monkeypatch):
    monkeypatch.setattr(tritium.runtime, "INTERPRETED", False)
    q, k, v = qkv()
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        tritium.flash_attention(q, k, v)


def cache_call(cache_seqlens, **changes):
    q = torch.randn(2, 1, 4, 32, device=DEVICE)
    k_cache, v_cache = (torch.randn(2, 16, 2, 32, device=DEVICE) for _ in range(2))
    snapshot = k_cache.clone(), v_cache.clone()
    new = dict(k=torch.randn(2, 1, 2, 32, device=DEVICE), v=torch.randn(2, 1, 2, 32, device=DEVICE))
    new.update(changes)
    try:
        return tritium.flash_attention_with_kvcache(q, k_cache, v_cache, cache_seqlens, **new)
    finally:
        assert torch.equal(k_cache, snapshot[0]) and torch.equal(v_cache, snapshot[1]), "cache changed"


@pytest.mark.parametrize(
    "seqlens,changes,error,words",
    [
        (16, {}, ValueError, "cache_seqlens: 16 cached + 1 new tokens do not fit max_seqlen 16"),
        (-1, {}, ValueError, "cache_seqlens: -1 cached"),
        ([3, 16], {}, ValueError, "cache_seqlens: values in [3, 16] with 1 new tokens do not fit"),
        ([3, -2], {}, ValueError, "cache_seqlens: values in"),
        ([3.0, 4.0], {}, TypeError, "cache_seqlens: expected dtype int32, int64"),
        ([3, 4, 5], {}, ValueError, "cache_seqlens: expected batch = 2"),
        (0, dict(k=torch.randn(2, 17, 2, 32), v=torch.randn(2, 17, 2, 32)), ValueError, "17 new tokens do not fit"),
        (0, dict(v=None), ValueError, "k, v: give both"),
        (0, dict(k=torch.randn(2, 1, 4, 32)), ValueError, "k: expected shape (batch, seqlen_new, heads_kv, head_dim)"),
        (0, dict(v=torch.randn(2, 2, 2, 32)), ValueError, "v: expected seqlen_new (as k)"),
        (0, dict(num_splits=0), ValueError, "num_splits"),
        (0, dict(k=torch.randn(2, 1, 2, 32, requires_grad=True)), ValueError, "has no backward"),
        (0, dict(key_padding_mask=torch.ones(2, 15, dtype=torch.bool)), ValueError, "key_padding_mask: expected shape"),
        (0, dict(key_padding_mask=torch.ones(2, 16)), TypeError, "key_padding_mask: expected dtype"),
        (0, dict(causal=True, window_size=(2, 3)), ValueError, "causal=True needs"),
    ],
)
def test_kvcache_errors_change_nothing(seqlens, changes, error, words):
    if isinstance(seqlens, list):
        dtype = torch.float32 if isinstance(seqlens[0], float) else torch.int32
        seqlens = torch.tensor(seqlens, dtype=dtype, device=DEVICE)
    changes = {n: x.to(DEVICE) if isinstance(x, torch.Tensor) else x for n, x in changes.items()}
    with pytest.raises(error) as info:
        cache_call(seqlens, **changes)
    assert words in str(info.value)
