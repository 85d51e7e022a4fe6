"""Memory safety: no index, length, stride or scale a caller passes makes a kernel read or
write outside its tensors, eagerly or under torch.compile(fullgraph=True), where the host's
range checks on tensor values are skipped (as in CUDA-graph capture) and only the kernels'
own guards stand.

Every tensor an op reads or writes is `fenced` (NaN or huge integers on both sides): a write
past it changes a fence, a read past it brings NaN or an absurd index into the result.
Good inputs must match the float64 reference; bad ones (cache lengths outside
[0, max_seqlen], rotary positions outside the table, integer tensors with stride 0 or 2)
must give the documented result. Compiled runs use inductor, which hands the op the
caller's own cache tensors: aot_eager mutates a clone and copies it back, so a stray write
there would miss the fences.
"""

import math
import re

import pytest
import torch
from accuracy import assert_close
from conftest import DEVICE, fenced

import tritium
from tritium import reference
from tritium.kernels.attention import MAX_SOFTCAP, MAX_SOFTMAX_SCALE, MIN_SOFTCAP

MODES = ("eager", "compiled")
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1


def call(mode, fn, *args, **kwargs):
    """fn(*args, **kwargs), eagerly or through a fresh fullgraph inductor compile (a reset
    per call: no recompile limit, so never a silent fall back to eager)."""
    if mode == "eager":
        return fn(*args, **kwargs)
    torch._dynamo.reset()
    return torch.compile(fn, fullgraph=True, backend="inductor")(*args, **kwargs)


def fence_all(*tensors):
    """fenced copies of tensors (None passes through; bool goes through a uint8 view, its
    fences 0xFF) and one function checking every fence."""
    copies, checks = [], []
    for x in tensors:
        if x is None:
            copies.append(None)
            continue
        inner, check = fenced(x.view(torch.uint8) if x.dtype == torch.bool else x)
        copies.append(inner.view(torch.bool) if x.dtype == torch.bool else inner)
        checks.append(check)

    def untouched():
        for check in checks:
            check()

    return copies, untouched


def integer_view(values, view, dtype):
    """A fenced (len(values),) integer tensor laid out as `view`: "contiguous", "stride-0"
    (one element expanded: values must be equal; the element after it is a fence) or
    "stride-2" (every other element; in between a decoy value, 1, that a kernel ignoring the
    stride would take for the next sequence's)."""
    if view == "stride-0":
        assert len(set(values)) == 1
        base, untouched = fenced(torch.tensor(values[:1], dtype=dtype, device=DEVICE))
        return base.expand(len(values)), untouched
    if view == "stride-2":
        interleaved = [x for value in values for x in (value, 1)]
        base, untouched = fenced(torch.tensor(interleaved, dtype=dtype, device=DEVICE))
        return base[::2], untouched
    return fenced(torch.tensor(values, dtype=dtype, device=DEVICE))


# ----------------------------------------------------------------------------- KV cache

MAX_SEQLEN = 40  # not a multiple of BLOCK_N (32): the last key block is partial
KVCACHE_CASES = {
    "decode-append-gqa": dict(seqlen_q=1, new=True, heads=(4, 2)),
    "decode-no-append-mqa-one-split": dict(seqlen_q=1, new=False, heads=(4, 1), num_splits=1),
    "multi-token-append": dict(seqlen_q=3, new=True, heads=(2, 2)),
    "split-kv-window-mask": dict(seqlen_q=2, new=True, heads=(4, 2), num_splits=3, window=(6, 0), mask=True),
}
# Lengths the host rejects when it may sync; under torch.compile the kernels see them.
BAD_SEQLENS = {
    "negative": (-2, -7),
    "past-the-end": (MAX_SEQLEN - 1, MAX_SEQLEN + 25),
    "int32-extremes": (INT32_MAX, INT32_MIN),
}


def kvcache_inputs(case, batch=2, head_dim=16):
    heads_q, heads_kv = case["heads"]
    seqlen_q = case["seqlen_q"]
    q = torch.randn(batch, seqlen_q, heads_q, head_dim, device=DEVICE)
    k_cache, v_cache = (torch.randn(batch, MAX_SEQLEN, heads_kv, head_dim, device=DEVICE) for _ in range(2))
    k = v = None
    if case["new"]:
        k, v = (torch.randn(batch, seqlen_q, heads_kv, head_dim, device=DEVICE) for _ in range(2))
    mask = None
    if case.get("mask"):
        mask = torch.rand(batch, MAX_SEQLEN, device=DEVICE) > 0.2
    return q, k_cache, v_cache, k, v, mask


def kvcache_options(case):
    return dict(causal=True, window_size=case.get("window", (-1, -1)), num_splits=case.get("num_splits"))


def kvcache_step(q, k_cache, v_cache, cache_seqlens, k, v, mask, options):
    return tritium.flash_attention_with_kvcache(q, k_cache, v_cache, cache_seqlens, k=k, v=v,
                                                key_padding_mask=mask, **options)


def kvcache_expected(q, k_cache, v_cache, cached, k, v, mask, options):
    """The documented result: cache_seqlens[b] is taken as min(max(value, 0), max_seqlen),
    the new rows that land before max_seqlen are written, the others dropped, and sequence b
    attends to its first min(that + seqlen_new, max_seqlen) rows. Returns the caches after
    the append, the float64 output and the float32 reference output."""
    max_seqlen = k_cache.shape[1]
    seqlen_new = k.shape[1] if k is not None else 0
    k_cache, v_cache = k_cache.clone(), v_cache.clone()
    opts = dict(causal=options["causal"], window_size=options["window_size"])
    truths, sames = [], []
    for b, value in enumerate(cached):
        start = min(max(value, 0), max_seqlen)
        fit = min(seqlen_new, max_seqlen - start)
        if fit:
            k_cache[b, start : start + fit], v_cache[b, start : start + fit] = k[b, :fit], v[b, :fit]
        n = start + fit
        args = (q[b : b + 1], k_cache[b : b + 1, :n], v_cache[b : b + 1, :n])
        m = mask[b : b + 1, :n] if mask is not None else None
        truths.append(reference.attention(*(x.double() for x in args), key_padding_mask=m, **opts))
        sames.append(reference.attention(*args, key_padding_mask=m, **opts))
    return k_cache, v_cache, torch.cat(truths), torch.cat(sames)


def check_kvcache(mode, case, cache_seqlens, cached, untouched_seqlens=None):
    """Run the op on fenced inputs with cache_seqlens (whose values are `cached`) and check
    fences, caches and output against the documented result."""
    q, k_cache, v_cache, k, v, mask = kvcache_inputs(case)
    options = kvcache_options(case)
    want_k, want_v, truth, same = kvcache_expected(q, k_cache, v_cache, cached, k, v, mask, options)
    (q, k_cache, v_cache, k, v, mask), untouched = fence_all(q, k_cache, v_cache, k, v, mask)
    out = call(mode, kvcache_step, q, k_cache, v_cache, cache_seqlens, k, v, mask, options)
    untouched()
    if untouched_seqlens is not None:
        untouched_seqlens()
    assert torch.equal(k_cache, want_k) and torch.equal(v_cache, want_v), "cache rows differ from the documented append"
    assert_close("out", out, same, truth, torch.float32)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", list(KVCACHE_CASES))
def test_kvcache_good_lengths_stay_inside(name, mode):
    case = KVCACHE_CASES[name]
    seqlen_new = case["seqlen_q"] if case["new"] else 0
    cached = (5, MAX_SEQLEN - seqlen_new)  # the second fills the cache to its last row
    cache_seqlens, untouched = integer_view(cached, "contiguous", torch.int32)
    check_kvcache(mode, case, cache_seqlens, cached, untouched)


@pytest.mark.parametrize("bad", list(BAD_SEQLENS))
@pytest.mark.parametrize("name", list(KVCACHE_CASES))
def test_kvcache_bad_lengths_are_clamped_under_compile(name, bad):
    """Unchecked under torch.compile: negative lengths count as 0, rows past max_seqlen are
    neither written nor attended, and nothing outside the caches is touched."""
    cached = BAD_SEQLENS[bad]
    cache_seqlens, untouched = integer_view(cached, "contiguous", torch.int32)
    check_kvcache("compiled", KVCACHE_CASES[name], cache_seqlens, cached, untouched)


def test_kvcache_int64_lengths_past_int32_are_clamped_under_compile():
    cached = (2**40, -(2**40))
    cache_seqlens, untouched = integer_view(cached, "contiguous", torch.int64)
    check_kvcache("compiled", KVCACHE_CASES["multi-token-append"], cache_seqlens, cached, untouched)


@pytest.mark.gpu
def test_kvcache_bad_lengths_are_clamped_in_a_cuda_graph():
    """CUDA-graph capture skips the host check too: the captured step, replayed with bad
    lengths copied into its static cache_seqlens, clamps as under torch.compile."""
    case = KVCACHE_CASES["multi-token-append"]
    q, k_cache0, v_cache0, k, v, _ = kvcache_inputs(case)
    options = kvcache_options(case)
    (q, k_cache, v_cache, k, v), untouched = fence_all(q, k_cache0, v_cache0, k, v)
    seqlens, untouched_seqlens = integer_view((5, 5), "contiguous", torch.int32)
    # Compiles the kernels and picks their configs, outside capture (on copies of the caches).
    kvcache_step(q, k_cache.clone(), v_cache.clone(), seqlens, k, v, None, options)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = kvcache_step(q, k_cache, v_cache, seqlens, k, v, None, options)
    for cached in BAD_SEQLENS.values():
        k_cache.copy_(k_cache0)
        v_cache.copy_(v_cache0)
        seqlens.copy_(torch.tensor(cached, dtype=torch.int32, device=DEVICE))
        graph.replay()
        torch.cuda.synchronize()
        untouched()
        untouched_seqlens()
        want_k, want_v, truth, same = kvcache_expected(q, k_cache0, v_cache0, cached, k, v, None, options)
        assert torch.equal(k_cache, want_k) and torch.equal(v_cache, want_v), f"{cached}: cache rows differ"
        assert_close("out", out, same, truth, torch.float32)


@pytest.mark.parametrize("bad", list(BAD_SEQLENS))
def test_kvcache_bad_lengths_raise_eagerly(bad):
    case = KVCACHE_CASES["decode-append-gqa"]
    q, k_cache, v_cache, k, v, _ = kvcache_inputs(case)
    cache_seqlens = torch.tensor(BAD_SEQLENS[bad], dtype=torch.int32, device=DEVICE)
    before = k_cache.clone()
    with pytest.raises(ValueError, match="cache_seqlens: values in"):
        tritium.flash_attention_with_kvcache(q, k_cache, v_cache, cache_seqlens, k=k, v=v)
    assert torch.equal(k_cache, before)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64], ids=str)
@pytest.mark.parametrize("view", ["stride-0", "stride-2"])
@pytest.mark.parametrize("new", [True, False], ids=["append", "no-append"])
def test_kvcache_lengths_read_with_their_strides(new, view, dtype, mode):
    """A (batch,) view: the kernels must read element b at b * stride, not at b."""
    case = dict(KVCACHE_CASES["split-kv-window-mask"], new=new)
    cached = (9, 9) if view == "stride-0" else (9, 30)
    cache_seqlens, untouched = integer_view(cached, view, dtype)
    check_kvcache(mode, case, cache_seqlens, cached, untouched)


# ----------------------------------------------------------------------------- rotary

SEQLEN_RO = 12


def rotary_step(q, k, cos, sin, offsets, interleaved, inplace):
    return tritium.apply_rotary(q, k, cos, sin, seqlen_offsets=offsets, interleaved=interleaved, inplace=inplace)


def rotary_expected(x, cos, sin, offsets, interleaved):
    """The documented result in float64: token t of sequence b rotated by table row
    t + offsets[b], or not rotated at all when that row is outside the table."""
    batch, seqlen = x.shape[:2]
    pos = torch.arange(seqlen, device=x.device)[None, :] + torch.tensor(offsets, device=x.device)[:, None]
    inside = (pos >= 0) & (pos < cos.shape[0])
    rows = pos.clamp(0, cos.shape[0] - 1)
    cos_b = torch.where(inside[..., None], cos.double()[rows], 1.0)
    sin_b = torch.where(inside[..., None], sin.double()[rows], 0.0)
    return reference.rotary(x.double(), cos_b, sin_b, interleaved=interleaved)


def check_rotary(mode, offsets, values, untouched_offsets, *, interleaved, inplace, batch=3, seqlen=4):
    q = torch.randn(batch, seqlen, 4, 24, device=DEVICE)
    k = torch.randn(batch, seqlen, 2, 24, device=DEVICE)
    cos, sin = torch.randn(SEQLEN_RO, 8, device=DEVICE), torch.randn(SEQLEN_RO, 8, device=DEVICE)
    want = [rotary_expected(x, cos, sin, values, interleaved) for x in (q, k)]
    (q, k, cos, sin), untouched = fence_all(q, k, cos, sin)
    outs = call(mode, rotary_step, q, k, cos, sin, offsets, interleaved, inplace)
    untouched()
    untouched_offsets()
    for name, out, truth in zip(("q", "k"), outs, want):
        assert not out.isnan().any(), f"{name}: NaN, a read past cos/sin"
        torch.testing.assert_close(out.double(), truth, atol=1e-5, rtol=1e-5, msg=f"{name} differs")


ROTARY_OFFSETS = {
    "in-range": (0, 3, SEQLEN_RO - 4),
    # Partly and wholly outside the table, and positions that would wrap in int32.
    "out-of-range": (-3, SEQLEN_RO - 2, INT32_MAX - 1),
    "very-negative": (INT32_MIN, -1, SEQLEN_RO),
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("inplace", [False, True], ids=["out-of-place", "inplace"])
@pytest.mark.parametrize("offsets", list(ROTARY_OFFSETS))
def test_rotary_offsets_stay_inside_the_table(offsets, inplace, mode):
    """Tensor offsets are never range-checked on the host: positions outside the table are
    not rotated, eagerly and compiled, and nothing outside cos/sin is read."""
    values = ROTARY_OFFSETS[offsets]
    tensor, untouched = integer_view(values, "contiguous", torch.int32)
    # One of the sets also runs the interleaved layout (its own loads and stores).
    check_rotary(mode, tensor, values, untouched, interleaved=offsets == "out-of-range", inplace=inplace)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("view", ["stride-0", "stride-2"])
def test_rotary_offsets_read_with_their_strides(view, mode):
    values = (2, 2, 2) if view == "stride-0" else (2, 0, 5)
    tensor, untouched = integer_view(values, view, torch.int32)
    # In place when compiled, out of place eagerly: both launch paths, at half the cost.
    check_rotary(mode, tensor, values, untouched, interleaved=False, inplace=mode == "compiled")


# ----------------------------------------------------------------------------- flash_attention


def attention_step(q, k, v, mask, options):
    return tritium.flash_attention(q, k, v, key_padding_mask=mask, **options)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("masked", [False, True], ids=["no-mask", "key-padding-mask"])
def test_flash_attention_stays_inside(masked, mode):
    batch, seqlen_q, seqlen_k, head_dim = 2, 19, 37, 12
    q = torch.randn(batch, seqlen_q, 4, head_dim, device=DEVICE)
    k, v = (torch.randn(batch, seqlen_k, 2, head_dim, device=DEVICE) for _ in range(2))
    mask = torch.rand(batch, seqlen_k, device=DEVICE) > 0.3 if masked else None
    options = dict(causal=True, window_size=(9, 0), softcap=30.0)
    truth = reference.attention(q.double(), k.double(), v.double(), key_padding_mask=mask, **options)
    same = reference.attention(q, k, v, key_padding_mask=mask, **options)
    (q, k, v, mask), untouched = fence_all(q, k, v, mask)
    out = call(mode, attention_step, q, k, v, mask, options)
    untouched()
    assert_close("out", out, same, truth, torch.float32)


# ----------------------------------------------------------------------------- scale and softcap

ATTENTION_OPS = {
    "flash_attention": lambda q, k, v, **kw: tritium.flash_attention(q, k, v, **kw),
    "kvcache": lambda q, k, v, **kw: tritium.flash_attention_with_kvcache(q, k, v, k.shape[1], **kw),
}


def small_qkv(q_scale=1.0):
    q = torch.randn(1, 3, 2, 16, device=DEVICE) * q_scale
    k, v = (torch.randn(1, 9, 2, 16, device=DEVICE) for _ in range(2))
    return q, k, v


@pytest.mark.parametrize("op", list(ATTENTION_OPS))
@pytest.mark.parametrize(
    "q_scale,options",
    [
        # The largest scale, on queries small enough that the scores are O(10).
        (1 / MAX_SOFTMAX_SCALE, dict(softmax_scale=MAX_SOFTMAX_SCALE)),
        # The largest softcap: tanh is the identity at this scale, scores as without it.
        (1.0, dict(softcap=MAX_SOFTCAP)),
        # The smallest softcap with the largest scale: every score within 1e-18 of 0.
        (1.0, dict(softcap=MIN_SOFTCAP, softmax_scale=MAX_SOFTMAX_SCALE)),
        (1 / MAX_SOFTMAX_SCALE, dict(softcap=MAX_SOFTCAP, softmax_scale=MAX_SOFTMAX_SCALE)),
    ],
    ids=["max-scale", "max-softcap", "min-softcap-max-scale", "max-softcap-max-scale"],
)
def test_scale_and_softcap_edges_are_finite_and_correct(q_scale, options, op):
    q, k, v = small_qkv(q_scale)
    out = ATTENTION_OPS[op](q, k, v, causal=True, **options)
    truth = reference.attention(q.double(), k.double(), v.double(), causal=True, **options)
    same = reference.attention(q, k, v, causal=True, **options)
    assert torch.isfinite(out).all()
    assert_close("out", out, same, truth, torch.float32)


@pytest.mark.parametrize("op", list(ATTENTION_OPS))
@pytest.mark.parametrize(
    "name,value",
    [
        ("softmax_scale", math.nextafter(MAX_SOFTMAX_SCALE, math.inf)),
        ("softmax_scale", 1e300),
        ("softcap", math.nextafter(MAX_SOFTCAP, math.inf)),
        ("softcap", 3e38),
        ("softcap", math.nextafter(MIN_SOFTCAP, 0.0)),
    ],
)
def test_scale_and_softcap_past_the_range_raise(name, value, op):
    q, k, v = small_qkv()
    with pytest.raises(ValueError, match=rf"{name}: expected .*1e\+18.* got {re.escape(repr(value))}"):
        ATTENTION_OPS[op](q, k, v, **{name: value})


def test_block_sparse_scale_past_the_range_raises():
    q, k, v = (torch.randn(1, 112, 2, 16, device=DEVICE) for _ in range(3))
    with pytest.raises(ValueError, match=r"softmax_scale: expected .*1e\+18"):
        tritium.block_sparse_attention(q, k, v, block_size=16, num_random_blocks=1, softmax_scale=1e300)


# ----------------------------------------------------------------------------- dense ops

DENSE_OPS = {
    # name: (tritium op, reference, inputs (rows 37, hidden 24, intermediate 40), differentiable)
    "linear": (lambda x, w, b: tritium.linear(x, w, b, activation="gelu_tanh"),
               lambda x, w, b: reference.linear(x, w, b, "gelu_tanh"), ((37, 24), (40, 24), (40,))),
    "gated_mlp": (lambda x, gu, d: tritium.gated_mlp(x, gu, d, "silu"),
                  lambda x, gu, d: reference.gated_mlp(x, gu, d, "silu"), ((37, 24), (80, 24), (24, 40))),
    "rms_norm": (lambda x, w, r: tritium.rms_norm(x, w, 1e-6, offset=1.0, residual=r),
                 lambda x, w, r: reference.rms_norm(x, w, 1e-6, offset=1.0, residual=r), ((37, 24), (24,), (37, 24))),
    "layer_norm": (lambda x, w, b: tritium.layer_norm(x, w, b, 1e-5),
                   lambda x, w, b: reference.layer_norm(x, w, b, 1e-5), ((37, 24), (24,), (24,))),
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", list(DENSE_OPS))
def test_dense_ops_stay_inside(name, mode):
    # No index comes from a value here: the shapes and strides alone must keep every load
    # and store inside, forward and (eagerly) backward.
    op, ref, shapes = DENSE_OPS[name]
    inputs = [torch.randn(shape, device=DEVICE) * shape[-1] ** -0.5 for shape in shapes]
    truth = ref(*(x.double() for x in inputs))
    same = ref(*inputs)
    fenced_inputs, untouched = fence_all(*inputs)
    for x in fenced_inputs:
        x.requires_grad_(mode == "eager")
    out = call(mode, op, *fenced_inputs)
    outs, sames, truths = (t if isinstance(t, tuple) else (t,) for t in (out, same, truth))
    for got, want_same, want in zip(outs, sames, truths):
        assert_close(name, got, want_same, want, torch.float32)
    if mode == "eager":
        grads = torch.autograd.grad(outs, fenced_inputs, [torch.randn_like(o) for o in outs])
        assert all(g.shape == x.shape and not g.isnan().any() for g, x in zip(grads, fenced_inputs))
    untouched()


# ----------------------------------------------------------------------------- fused loss


def lce(hidden, weight, labels, bias):
    return tritium.linear_cross_entropy(hidden, weight, labels, bias=bias, softcap=20.0, reduction="none")


def lce_inputs(labels_from=0):
    generator = torch.Generator().manual_seed(7)
    hidden = torch.randn(37, 24, generator=generator).to(DEVICE)
    weight = (torch.randn(70, 24, generator=generator) * 0.3).to(DEVICE)
    bias = torch.randn(70, generator=generator).to(DEVICE)
    labels = torch.randint(labels_from, 70, (37,), generator=generator).to(DEVICE)
    labels[::5] = -100
    return hidden, weight, labels, bias


@pytest.mark.parametrize("mode", MODES)
def test_linear_cross_entropy_stays_inside(mode):
    """Every tensor fenced (the labels too): the per-row losses match float64, and eagerly
    the gradients of hidden, weight and bias are finite, with nothing read or written past."""
    hidden, weight, labels, bias = lce_inputs()
    truth = reference.linear_cross_entropy(hidden.double(), weight.double(), labels, bias=bias.double(), softcap=20.0,
                                           reduction="none")
    same = reference.linear_cross_entropy(hidden, weight, labels, bias=bias, softcap=20.0, reduction="none")
    (hidden, weight, labels, bias), untouched = fence_all(hidden, weight, labels, bias)
    for x in (hidden, weight, bias):
        x.requires_grad_(mode == "eager")
    out = call(mode, lce, hidden, weight, labels, bias)
    assert_close("loss", out, same, truth, torch.float32)
    if mode == "eager":
        grads = torch.autograd.grad(out, (hidden, weight, bias), torch.randn_like(out))
        assert all(not g.isnan().any() for g in grads)
    untouched()


@pytest.mark.parametrize("bad", [70, -5, 2**40])
def test_linear_cross_entropy_bad_labels(bad):
    """A label that is neither a class nor ignore_index: refused eagerly; under compile
    (host check skipped) it is only compared with class indices, so its row's loss is the
    log-sum-exp alone (no logit picked) and nothing outside the tensors is touched."""
    hidden, weight, labels, bias = lce_inputs(labels_from=1)
    labels[3] = bad
    with pytest.raises(ValueError, match=f"labels: {bad} is neither ignore_index"):
        lce(hidden, weight, labels, bias)
    (hidden, weight, labels, bias), untouched = fence_all(hidden, weight, labels, bias)
    out = call("compiled", lce, hidden, weight, labels, bias)
    logits = torch.tanh((hidden.double() @ weight.double().T + bias.double()) / 20.0) * 20.0
    assert abs(out[3].item() - torch.logsumexp(logits[3], 0).item()) <= 1e-4
    good = labels.clone()
    good[3] = -100
    expected = reference.linear_cross_entropy(hidden.double(), weight.double(), good, bias=bias.double(), softcap=20.0,
                                              reduction="none")
    assert (out.double() - expected).abs()[torch.arange(37, device=DEVICE) != 3].max() <= 1e-4
    untouched()
