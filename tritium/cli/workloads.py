"""What `tritium tune --model NAME` tunes: the attention, MLP, norm and rotary shapes of
each model family, run through the public ops so every kernel of a call path meets its
real problem bucket (prefill and training at batch x seqlen tokens, decode at batch).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import torch

import tritium
from tritium.kernels.block_sparse import min_seqlen


@dataclass(frozen=True)
class AttentionShape:
    """One attention of a model. window: Hugging Face's sliding_window (0 = none);
    cross: keys come from an encoder of another length; decoder: also runs KV-cache decode."""

    heads_q: int
    heads_kv: int
    head_dim: int
    causal: bool = True
    window: int = 0
    softcap: float = 0.0
    cross: bool = False
    decoder: bool = True


def _gemma2(heads_q: int, heads_kv: int, head_dim: int) -> tuple[AttentionShape, ...]:
    # Global and sliding-window layers alternate; both cap the logits at 50.
    return (AttentionShape(heads_q, heads_kv, head_dim, softcap=50.0),
            AttentionShape(heads_q, heads_kv, head_dim, window=4096, softcap=50.0))


def _encoder_decoder(heads: int, head_dim: int) -> tuple[AttentionShape, ...]:
    return (AttentionShape(heads, heads, head_dim, causal=False, decoder=False),  # encoder
            AttentionShape(heads, heads, head_dim),  # decoder self-attention
            AttentionShape(heads, heads, head_dim, causal=False, cross=True))  # cross-attention


MODELS: dict[str, tuple[AttentionShape, ...]] = {
    "gemma2-2b": _gemma2(8, 4, 256),
    "gemma2-9b": _gemma2(16, 8, 256),
    "gemma2-27b": _gemma2(32, 16, 128),
    "glm4-9b": (AttentionShape(32, 2, 128),),
    "mvp": _encoder_decoder(16, 64),
    # The encoder's block-sparse attention is tuned with its own kernel; these are the dense ones.
    "bigbird-pegasus-large": _encoder_decoder(16, 64)[1:],
    "bert-large": (AttentionShape(16, 16, 64, causal=False, decoder=False),),
}


@dataclass(frozen=True)
class LayerShape:
    """The rest of a layer: its MLP (gated: act(gate) * up from one stacked weight), its
    norm ("gemma", "llama" or "layer") and its rotary features (0: learned positions)."""

    hidden: int
    intermediate: int
    activation: str
    gated: bool
    norm: str
    rotary_dim: int = 0
    interleaved: bool = False


LAYERS: dict[str, LayerShape] = {
    "gemma2-2b": LayerShape(2304, 9216, "gelu_tanh", True, "gemma", rotary_dim=256),
    "gemma2-9b": LayerShape(3584, 14336, "gelu_tanh", True, "gemma", rotary_dim=256),
    "gemma2-27b": LayerShape(4608, 36864, "gelu_tanh", True, "gemma", rotary_dim=128),
    "glm4-9b": LayerShape(4096, 13696, "silu", True, "llama", rotary_dim=64, interleaved=True),
    "mvp": LayerShape(1024, 4096, "gelu", False, "layer"),
    "bigbird-pegasus-large": LayerShape(1024, 4096, "gelu_tanh", False, "layer"),
    "bert-large": LayerShape(1024, 4096, "gelu", False, "layer"),
}


@dataclass(frozen=True)
class Step:
    """One problem to run with tuning on: a label for the progress bar and the call."""

    label: str
    run: Callable[[], None]


# BigBird-Pegasus-large's encoder: block-sparse attention (16 heads of 64, blocks of 64, 3 random).
BLOCK_SPARSE = {"bigbird-pegasus-large": (16, 64, 64, 3)}
# The training loss of the decoders: (vocabulary, final logit softcap) of the LM head.
LM_HEADS = {"gemma2-2b": (256000, 30.0), "gemma2-9b": (256000, 30.0), "gemma2-27b": (256000, 30.0),
            "glm4-9b": (151552, 0.0)}


def steps(model: str, batches: list[int], seqlens: list[int], dtype: torch.dtype,
          device: str = "cuda", backward: bool = True, nf4: bool = False) -> Iterator[Step]:
    """The calls that meet every kernel problem of `model` at these sizes: prefill
    (forward, and backward when `backward`) and, for decoders, one decode step at each
    context length. nf4: also the 4-bit matmuls of the MLP weights (QLoRA, 4-bit decode)."""
    layer = LAYERS[model]
    decoder = any(shape.decoder for shape in MODELS[model])
    # Attention first: a tuning run cut short by a time limit has the headline kernels.
    for shape in MODELS[model]:
        for batch in batches:
            for seqlen in seqlens:
                yield Step(f"{shape.head_dim}d {batch}x{seqlen} prefill" + (" +bwd" if backward else ""),
                           _prefill(shape, batch, seqlen, dtype, device, backward))
                if shape.decoder:
                    yield Step(f"{shape.head_dim}d {batch}x{seqlen} decode", _decode(shape, batch, seqlen, dtype, device))
    for batch in batches:
        for tokens in [batch * seqlen for seqlen in seqlens] + ([batch] if decoder else []):
            yield Step(f"mlp+norm {tokens} tokens", _dense_layer(layer, tokens, dtype, device, backward))
            if nf4:
                yield Step(f"nf4 mlp {tokens} tokens", _nf4_layer(layer, tokens, dtype, device))
        if backward and model in LM_HEADS:
            for seqlen in seqlens:
                yield Step(f"lm-head loss {batch}x{seqlen} +bwd", _loss(layer, LM_HEADS[model], batch * seqlen, dtype,
                                                                        device))
        if model in BLOCK_SPARSE:
            for seqlen in seqlens:
                yield Step(f"block-sparse {batch}x{seqlen}", _block_sparse(BLOCK_SPARSE[model], batch, seqlen, dtype,
                                                                           device, backward))
        if layer.rotary_dim:
            for seqlen in seqlens:
                yield Step(f"rotary {batch}x{seqlen}", _rotary(MODELS[model][0], layer, batch, seqlen, dtype, device,
                                                                backward))


def _window(shape: AttentionShape) -> tuple[int, int]:
    return (shape.window - 1, 0) if shape.window else (-1, -1)


def _prefill(shape, batch, seqlen, dtype, device, backward) -> Callable[[], None]:
    def run():
        # Cross-attention: a summary (a quarter of the source's length) reads the source.
        seqlen_q = max(seqlen // 4, 1) if shape.cross else seqlen
        q = torch.randn(batch, seqlen_q, shape.heads_q, shape.head_dim, device=device, dtype=dtype)
        k, v = (torch.randn(batch, seqlen, shape.heads_kv, shape.head_dim, device=device, dtype=dtype)
                for _ in range(2))
        for x in (q, k, v):
            x.requires_grad_(backward)
        out = tritium.flash_attention(q, k, v, causal=shape.causal, window_size=_window(shape), softcap=shape.softcap)
        if backward:
            out.backward(torch.randn_like(out))

    return run


def _decode(shape, batch, context, dtype, device) -> Callable[[], None]:
    def run():
        cache = (batch, context, shape.heads_kv, shape.head_dim)
        k_cache, v_cache = (torch.randn(cache, device=device, dtype=dtype) for _ in range(2))
        q = torch.randn(batch, 1, shape.heads_q, shape.head_dim, device=device, dtype=dtype)
        tritium.flash_attention_with_kvcache(q, k_cache, v_cache, context - 1, causal=True,
                                             window_size=_window(shape), softcap=shape.softcap)

    return run


def _dense_layer(layer: LayerShape, tokens: int, dtype, device, backward) -> Callable[[], None]:
    def run():
        x = torch.randn(tokens, layer.hidden, device=device, dtype=dtype, requires_grad=backward)
        weight = torch.randn(layer.hidden, device=device, dtype=dtype, requires_grad=backward)
        if layer.norm == "layer":
            normed = tritium.layer_norm(x, weight, torch.zeros_like(weight))
        else:
            normed = tritium.rms_norm(x, weight, offset=1.0 if layer.norm == "gemma" else 0.0)
        scale = layer.hidden**-0.5
        if layer.gated:
            gate_up = torch.randn(2 * layer.intermediate, layer.hidden, device=device, dtype=dtype) * scale
            down = torch.randn(layer.hidden, layer.intermediate, device=device, dtype=dtype) * scale
            out = tritium.gated_mlp(normed, gate_up.requires_grad_(backward), down.requires_grad_(backward),
                                    layer.activation)
        else:
            fc1 = torch.randn(layer.intermediate, layer.hidden, device=device, dtype=dtype) * scale
            out = tritium.linear(normed, fc1.requires_grad_(backward), None, layer.activation)
        if backward:
            out.backward(torch.randn_like(out))

    return run


def _loss(layer: LayerShape, head: tuple[int, float], tokens: int, dtype, device) -> Callable[[], None]:
    def run():
        vocab, softcap = head
        hidden = torch.randn(tokens, layer.hidden, device=device, dtype=dtype, requires_grad=True)
        weight = (torch.randn(vocab, layer.hidden, device=device, dtype=dtype) * layer.hidden**-0.5).requires_grad_()
        labels = torch.randint(0, vocab, (tokens,), device=device)
        tritium.linear_cross_entropy(hidden, weight, labels, softcap=softcap).backward()

    return run


def _rotary(shape: AttentionShape, layer: LayerShape, batch, seqlen, dtype, device, backward) -> Callable[[], None]:
    def run():
        q = torch.randn(batch, seqlen, shape.heads_q, shape.head_dim, device=device, dtype=dtype,
                        requires_grad=backward)
        k = torch.randn(batch, seqlen, shape.heads_kv, shape.head_dim, device=device, dtype=dtype,
                        requires_grad=backward)
        angles = torch.rand(seqlen, layer.rotary_dim // 2, device=device)
        q_out, k_out = tritium.apply_rotary(q, k, angles.cos(), angles.sin(), interleaved=layer.interleaved)
        if backward:
            torch.autograd.backward((q_out, k_out), (torch.randn_like(q_out), torch.randn_like(k_out)))

    return run


def _nf4_layer(layer: LayerShape, tokens: int, dtype, device) -> Callable[[], None]:
    def run():
        x = torch.randn(tokens, layer.hidden, device=device, dtype=dtype)
        up_rows = 2 * layer.intermediate if layer.gated else layer.intermediate
        for shape in ((up_rows, layer.hidden), (layer.hidden, layer.intermediate)):
            weight = tritium.nf4.quantize(torch.randn(shape, device=device, dtype=dtype), double_quant=True)
            tritium.nf4.matmul(x if shape[1] == layer.hidden else torch.randn(tokens, shape[1], device=device,
                                                                                 dtype=dtype), weight)

    return run


def _block_sparse(shape: tuple, batch, seqlen, dtype, device, backward) -> Callable[[], None]:
    heads, head_dim, block_size, random = shape

    def run():
        if seqlen < min_seqlen(block_size, random):
            return  # transformers uses full attention there: the dense kernels cover it
        q, k, v = (torch.randn(batch, seqlen, heads, head_dim, device=device, dtype=dtype, requires_grad=backward)
                   for _ in range(3))
        out = tritium.block_sparse_attention(q, k, v, block_size=block_size, num_random_blocks=random)
        if backward:
            out.backward(torch.randn_like(out))

    return run
