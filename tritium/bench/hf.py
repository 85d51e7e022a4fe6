"""transformers suite: one Gemma 2 model run end to end under each attention implementation.

The same model (Gemma 2 2B's shapes with few layers on CUDA, a tiny config on CPU) with
attn_implementation "eager", "sdpa", "flex_attention" (CUDA only) and "tritium", and
"tritium+apply" (tritium.hf.apply: also RMSNorm and MLP). Prefill: a forward over
`seqlen` tokens returning the logits of the last LOGITS_KEPT positions (generate's prefill
keeps one; full 256k-vocabulary logits at 8k tokens would time the lm_head, not
attention). Decode: one token against a DynamicCache holding `context` tokens, prefilled
by the same backend, restored to that state before every timed step.

Error: against the same weights in float64 under "eager" (the float64 copy runs on the
same device; eager is the exact definition, softcap included). Eager in the model's dtype
is the accuracy reference: its error, which grows with the logits' scale and the depth,
sets every row's tolerance (benchmarks/accuracy.py). SDPA would drop Gemma 2's
attention softcap, so it is timed as a reference point only (exact=False); transformers
5.23 refuses "sdpa" for Gemma 2 altogether, which the row notes.
"""

from __future__ import annotations

import contextlib
import copy

import torch

from tritium.bench.operators import Backend, Case, Operator, Unsupported, register

SUITE = "hf"
LOGITS_KEPT = 64
# Gemma 2 2B (google/gemma-2-2b) with `layers` layers; alternating sliding/global layers.
GEMMA2_2B = dict(vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_attention_heads=8,
                 num_key_value_heads=4, head_dim=256, sliding_window=4096, query_pre_attn_scalar=256,
                 attn_logit_softcapping=50.0, final_logit_softcapping=30.0, max_position_embeddings=8192)
# The CPU (interpreter) model: small enough to run interpreted in seconds.
TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, sliding_window=32, query_pre_attn_scalar=16, attn_logit_softcapping=50.0,
            final_logit_softcapping=30.0, max_position_embeddings=256)


# ----------------------------------------------------------------------------- cases


def _case(kind: str, tokens: int, device: str) -> Case:
    layers, dtype = (2, "bfloat16") if device == "cuda" else (2, "float32")
    params = {"kind": kind, "tokens": tokens, "batch": 1, "layers": layers, "dtype": dtype,
              "shape": "gemma-2-2b" if device == "cuda" else "tiny"}
    name = f"gemma2-{params['shape']}-l{layers}-{kind}{tokens}"
    return Case(name, tokens, f"Gemma 2 ({params['shape']}, {layers} layers), {kind}", params)


def _prefill_cases(device: str, quick: bool) -> list[Case]:
    if device == "cpu":
        return [_case("prefill", 64, device)]
    return [_case("prefill", s, device) for s in ((1024, 8192) if quick else (1024, 2048, 4096, 8192))]


def _decode_cases(device: str, quick: bool) -> list[Case]:
    if device == "cpu":
        return [_case("decode", 64, device)]
    return [_case("decode", c, device) for c in ((8192,) if quick else (1024, 4096, 8192))]


# ----------------------------------------------------------------------------- inputs and work


def _inputs(case: Case, device: str) -> dict:
    """The model (shared by every backend of the case: setup switches its implementation)
    and token ids: `tokens` of them, plus the decode token."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    p = case.params
    shape = GEMMA2_2B if p["shape"] == "gemma-2-2b" else TINY
    config = Gemma2Config(**shape, num_hidden_layers=p["layers"], attention_dropout=0.0)
    model = Gemma2ForCausalLM(config).to(device=device, dtype=getattr(torch, p["dtype"])).eval()
    ids = torch.randint(0, config.vocab_size, (p["batch"], p["tokens"] + 1), device=device)
    return {"model": model, "ids": ids}


def _params(case: Case) -> tuple[int, int]:
    """(parameters per layer, hidden size) of the case's config."""
    shape = GEMMA2_2B if case.params["shape"] == "gemma-2-2b" else TINY
    h, d = shape["hidden_size"], shape["head_dim"]
    attn = h * d * (2 * shape["num_attention_heads"] + 2 * shape["num_key_value_heads"])
    return attn + 3 * h * shape["intermediate_size"], h


def _flops(case: Case, mode: str) -> float:
    """GEMM flops of the layers and the kept logits, plus attention over every visible
    (query, key) pair (causal; the sliding window ignored: it only bites past 4096)."""
    p = case.params
    shape = GEMMA2_2B if p["shape"] == "gemma-2-2b" else TINY
    per_layer, hidden = _params(case)
    n = p["tokens"]
    queries, pairs = (n, n * (n + 1) // 2) if p["kind"] == "prefill" else (1, n + 1)
    attention = 4 * shape["num_attention_heads"] * shape["head_dim"] * pairs
    kept = min(LOGITS_KEPT, queries)
    return p["batch"] * (p["layers"] * (2 * per_layer * queries + attention) + 2 * hidden * shape["vocab_size"] * kept)


def _nbytes(case: Case, mode: str) -> float:
    """The layer weights and the lm_head read once; in decode also the KV cache."""
    p = case.params
    shape = GEMMA2_2B if p["shape"] == "gemma-2-2b" else TINY
    per_layer, hidden = _params(case)
    size = getattr(torch, p["dtype"]).itemsize
    weights = (p["layers"] * per_layer + hidden * shape["vocab_size"]) * size
    if p["kind"] == "prefill":
        return weights
    kv = 2 * shape["num_key_value_heads"] * shape["head_dim"] * p["tokens"] * p["layers"] * p["batch"] * size
    return weights + kv


# ----------------------------------------------------------------------------- accuracy


def _error(case: Case, inputs: dict, outputs: tuple, grad_out) -> float:
    """Max abs error of the logits against the model in float64 under "eager", computed
    once per case (the decode reference is the prefill of context + 1 tokens: its last
    position is what the decode step computes)."""
    if "reference" not in inputs:
        # Reverted before the copy: patches are recorded per model, a copy's would stay.
        _use(inputs["model"], "eager")
        model, ids = copy.deepcopy(inputs["model"]).double(), inputs["ids"]
        with torch.no_grad():
            if case.params["kind"] == "prefill":
                logits = model(input_ids=ids[:, :-1], logits_to_keep=LOGITS_KEPT, use_cache=False).logits
            else:
                logits = model(input_ids=ids, logits_to_keep=1, use_cache=False).logits
        inputs["reference"] = logits
    return (outputs[0].double() - inputs["reference"]).abs().max().item()


# ----------------------------------------------------------------------------- backends


def _use(model, implementation: str) -> None:
    """Switch the shared model to `implementation` ("tritium+apply": tritium and apply)."""
    import tritium.hf

    tritium.hf.revert(model)
    if implementation == "tritium+apply":
        tritium.hf.apply(model)
        return
    try:
        model.set_attn_implementation(implementation)
    except ValueError as exc:  # transformers refuses an implementation the model does not support
        raise Unsupported(str(exc).split(". ")[0]) from exc


def _prefill(implementation: str):
    def setup(case: Case, t: dict):
        if implementation == "flex_attention" and t["ids"].device.type != "cuda":
            raise Unsupported("flex_attention is benchmarked on CUDA only (it compiles)")
        model, ids = t["model"], t["ids"][:, :-1]
        _use(model, implementation)

        def run():
            with torch.no_grad():
                return model(input_ids=ids, logits_to_keep=LOGITS_KEPT, use_cache=False).logits

        return run

    return setup


@contextlib.contextmanager
def no_progress_bar():
    """transformers without its progress bars inside the block: from_pretrained's "Loading
    weights" and save_pretrained's "Writing model shards" would interleave with the run's own."""
    from transformers.utils import logging

    enabled = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            logging.enable_progress_bar()


def snapshot_cache(cache) -> list[tuple]:
    """The tensors a transformers DynamicCache holds, per layer (references, no copy)."""
    return [(layer.keys, layer.values, getattr(layer, "cumulative_length", None)) for layer in cache.layers]


def restore_cache(cache, saved: list[tuple]) -> None:
    """Put the cache back to the prefilled state (tensor references: no copy)."""
    for layer, (keys, values, length) in zip(cache.layers, saved, strict=True):
        layer.keys, layer.values = keys, values
        if length is not None:
            layer.cumulative_length = length


def _decode(implementation: str):
    def setup(case: Case, t: dict):
        from transformers import DynamicCache

        if implementation == "flex_attention" and t["ids"].device.type != "cuda":
            raise Unsupported("flex_attention is benchmarked on CUDA only (it compiles)")
        model, ids = t["model"], t["ids"]
        _use(model, implementation)
        cache = DynamicCache(config=model.config)
        with torch.no_grad():
            model(input_ids=ids[:, :-1], past_key_values=cache, logits_to_keep=1)
        saved = snapshot_cache(cache)

        def run():
            restore_cache(cache, saved)
            with torch.no_grad():
                return model(input_ids=ids[:, -1:], past_key_values=cache).logits

        return run

    return setup


# ----------------------------------------------------------------------------- operators


def _backends(setup) -> tuple[Backend, ...]:
    return (
        Backend("eager", setup("eager")),
        Backend("sdpa", setup("sdpa"), exact=False),  # drops the attention softcap
        Backend("flex_attention", setup("flex_attention")),
        Backend("tritium", setup("tritium")),
        Backend("tritium+apply", setup("tritium+apply")),
    )


_COMMON = {"suite": SUITE, "inputs": _inputs, "baseline": {"cuda": "eager", "cpu": "eager"}, "flops": _flops,
           "nbytes": _nbytes, "error": _error}

register(Operator(name="hf_gemma2_prefill", modes=("prefill",), cases=_prefill_cases, backends=_backends(_prefill),
                  **_COMMON))
register(Operator(name="hf_gemma2_decode", modes=("decode",), cases=_decode_cases, backends=_backends(_decode),
                  headline="gbps", x_name="context", **_COMMON))
