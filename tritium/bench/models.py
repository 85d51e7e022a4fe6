"""models suite: the compact decoders of tritium.models end to end, against transformers
holding the same weights.

Models: Gemma 2 2B and 9B, GLM-4 9B and Gemma 3 1B with random weights of their real
shapes and every layer on CUDA (bfloat16); on CPU a tiny config (2 layers, hidden 64) of
each family, one case per operator, in float32. Weights: normal(0, 0.02), RMSNorm scales
1 + normal(0, 0.02) (stored as each family stores them), from a seeded generator, in the
compact model; transformers' model of the family is built from that model's tensors,
shared rather than copied (Gemma's gate_proj and up_proj are views of its fused
gate_up_proj).

Operators (a decode row's tokens/s = batch / time, so its speedups are tokens/s ratios):
- models_prefill: a forward over `seqlen` tokens (batch 1) returning the logits of the last
  LOGITS_KEPT positions (generate's prefill keeps one; a 256k-vocabulary head over every
  position would time the head, not the model); x = seqlen, up to each model's context.
- models_decode: one token for each of `batch` sequences after DECODE_CONTEXT cached
  tokens, prefilled by the same backend and put back to that state before every timed
  step; x = batch.
- models_prefill_nf4, models_decode_nf4: the same with every decoder-layer linear weight in
  NF4 (blocksize 64, no double quantization: tritium.models.load's quantization="nf4" and
  BitsAndBytesConfig's defaults); embeddings, norms and LM head dense.

Backends:
- tritium: the compact model under tritium attention (in the NF4 operators, built with
  quantization="nf4"). Its decode step is generate's: replayed from a CUDA graph on CUDA.
- hf-eager (the baseline) and hf-sdpa: transformers; decode with a DynamicCache, as its
  generate does by default. SDPA cannot apply Gemma 2's attention softcap: transformers
  refuses it, and so does the row.
- hf-static-compiled (decode, CUDA only): transformers' StaticCache and its forward compiled
  with torch.compile(mode="reduce-overhead") (CUDA graphs), as generate compiles a static
  cache, under its best exact attention (sdpa; eager under a softcap). The first timed call
  of each case compiles.
- hf-bnb-nf4 (the NF4 baseline, CUDA only): transformers with BitsAndBytesConfig(
  load_in_4bit=True, bnb_4bit_quant_type="nf4"), compute dtype the model's, its best exact
  attention, a DynamicCache; skipped where bitsandbytes (or the accelerate it needs) is not
  installed.
- hf-eager-dequantized (NF4): transformers under eager with the NF4 weights dequantized to
  the model dtype: PyTorch computing the NF4 model, the accuracy reference (and the CPU
  baseline).

Error: the logits against the same model in float64 under transformers' eager attention, its
decoder layers widened one at a time while each runs (a 9B model's float64 copy would not fit
beside it); the NF4 operators' against the NF4 weights dequantized to float32, the function
every NF4 backend computes. A decode is checked on its first REFERENCE_ROWS sequences (the
rows are independent) against the prefill of context + 1 tokens. hf-eager (NF4:
hf-eager-dequantized) sets the tolerance. A reference that does not fit in memory leaves the
row's accuracy unchecked, not its time.

Memory: a case's models are built on demand and dropped when a backend asks for others
(rebuilt from the seed when asked again), so a row's peak memory counts its backend's model
and cache, not the other backends'.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable

import torch
from torch import nn

from tritium.bench.hf import no_progress_bar, restore_cache, snapshot_cache
from tritium.bench.operators import Backend, Case, Operator, Unsupported, register
from tritium.kernels import nf4
from tritium.models import MODEL_TYPES
from tritium.models.generate import CapturedStep
from tritium.models.nf4_linear import NF4Linear, weight_state_dict
from tritium.models.norms import RMSNorm

SUITE = "models"
LOGITS_KEPT = 64
# Within every model's sliding window (Gemma 3 1B: 512): once full, transformers' static
# sliding-window cache rolls its contents, and a timed step would not start from one state.
DECODE_CONTEXT, CPU_CONTEXT = 511, 32
PREFILL_SEQLENS = (512, 1024, 2048, 4096, 8192, 16384)
DECODE_BATCHES = (1, 4, 16, 64)
REFERENCE_ROWS = 2
STD, SEED = 0.02, 0
BLOCKSIZE, DOUBLE_QUANT = 64, False

# config.json of each benchmarked checkpoint (Gemma 3 1B: google/gemma-3-1b-pt; GLM-4 9B:
# THUDM/GLM-4-9B-0414), every layer.
MODELS = {
    "gemma-2-2b": dict(model_type="gemma2", vocab_size=256000, hidden_size=2304, intermediate_size=9216,
                       num_hidden_layers=26, num_attention_heads=8, num_key_value_heads=4, head_dim=256,
                       query_pre_attn_scalar=256, sliding_window=4096, attn_logit_softcapping=50.0,
                       final_logit_softcapping=30.0, max_position_embeddings=8192, pad_token_id=0),
    "gemma-2-9b": dict(model_type="gemma2", vocab_size=256000, hidden_size=3584, intermediate_size=14336,
                       num_hidden_layers=42, num_attention_heads=16, num_key_value_heads=8, head_dim=256,
                       query_pre_attn_scalar=256, sliding_window=4096, attn_logit_softcapping=50.0,
                       final_logit_softcapping=30.0, max_position_embeddings=8192, pad_token_id=0),
    "glm-4-9b": dict(model_type="glm4", vocab_size=151552, hidden_size=4096, intermediate_size=13696,
                     num_hidden_layers=40, num_attention_heads=32, num_key_value_heads=2, head_dim=128,
                     partial_rotary_factor=0.5, attention_bias=True, rms_norm_eps=1e-5, rope_theta=10000.0,
                     max_position_embeddings=32768, tie_word_embeddings=False, pad_token_id=151329),
    "gemma-3-1b": dict(model_type="gemma3_text", vocab_size=262144, hidden_size=1152, intermediate_size=6912,
                       num_hidden_layers=26, num_attention_heads=4, num_key_value_heads=1, head_dim=256,
                       query_pre_attn_scalar=256, sliding_window=512, rope_theta=1e6, rope_local_base_freq=10000.0,
                       max_position_embeddings=32768, pad_token_id=0),
}
# Beyond one GPU's comfort: the tensor-parallel decode's (benchmarks/tp.py) largest
# (google/gemma-2-27b), not in this suite's single-GPU cases.
LARGE = {
    "gemma-2-27b": dict(model_type="gemma2", vocab_size=256000, hidden_size=4608, intermediate_size=36864,
                        num_hidden_layers=46, num_attention_heads=32, num_key_value_heads=16, head_dim=128,
                        query_pre_attn_scalar=144, sliding_window=4096, attn_logit_softcapping=50.0,
                        final_logit_softcapping=30.0, max_position_embeddings=8192, pad_token_id=0),
}
# The CPU (interpreter) models: a sliding window shorter than the prompt, so it bites.
_TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, max_position_embeddings=256, pad_token_id=0)
TINY = {
    "gemma-2-tiny": dict(_TINY, model_type="gemma2", query_pre_attn_scalar=16, sliding_window=16,
                         attn_logit_softcapping=50.0, final_logit_softcapping=30.0),
    "glm-4-tiny": dict(_TINY, model_type="glm4", partial_rotary_factor=0.5, attention_bias=True,
                       tie_word_embeddings=False),
    "gemma-3-tiny": dict(_TINY, model_type="gemma3_text", query_pre_attn_scalar=16, sliding_window=16,
                         layer_types=["sliding_attention", "full_attention"], rope_local_base_freq=10000.0),
}
SHAPES = {**MODELS, **LARGE, **TINY}
HF_CLASSES = {"gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM", "glm4": "Glm4ForCausalLM"}

# (kind, nf4) -> the CUDA quick cases, (model, seqlen or batch): where the targets are set
# (NF4 prefill is the nf4 suite's GEMM); and the one CPU case.
QUICK = {("prefill", False): (("gemma-2-2b", 8192), ("glm-4-9b", 8192)),
         ("decode", False): (("gemma-2-2b", 1),),
         ("prefill", True): (),
         ("decode", True): (("gemma-2-2b", 1),)}
# The interpreted NF4 matmul is slow: its prefill is left to the nf4 suite's CPU cases.
CPU = {("prefill", False): ("gemma-2-tiny", 32), ("decode", False): ("glm-4-tiny", 2),
       ("prefill", True): None, ("decode", True): ("gemma-3-tiny", 1)}


# ----------------------------------------------------------------------------- cases


def model_case(model: str, kind: str, x: int, nf4_weights: bool) -> Case:
    raw = SHAPES[model]
    tiny = model in TINY
    tokens, batch = (x, 1) if kind == "prefill" else (CPU_CONTEXT if tiny else DECODE_CONTEXT, x)
    params = {"model": model, "kind": kind, "tokens": tokens, "batch": batch, "layers": raw["num_hidden_layers"],
              "dtype": "float32" if tiny else "bfloat16", "nf4": nf4_weights}
    stem = f"{model}-nf4" if nf4_weights else model
    name = f"{stem}-prefill{tokens}" if kind == "prefill" else f"{stem}-decode-b{batch}-c{tokens}"
    weights = ", NF4" if nf4_weights else ""
    what = "prefill" if kind == "prefill" else f"decode after {tokens} tokens"
    return Case(name, x, f"{model} ({raw['num_hidden_layers']} layers{weights}), {what}", params)


def _cases(kind: str, nf4_weights: bool) -> Callable[[str, bool], list[Case]]:
    def cases(device: str, quick: bool) -> list[Case]:
        if device == "cpu":
            chosen = CPU[kind, nf4_weights]
            return [] if chosen is None else [model_case(chosen[0], kind, chosen[1], nf4_weights)]
        if quick:
            return [model_case(model, kind, x, nf4_weights) for model, x in QUICK[kind, nf4_weights]]
        if kind == "decode":
            return [model_case(model, kind, b, nf4_weights) for model in MODELS for b in DECODE_BATCHES]
        return [model_case(model, kind, s, nf4_weights) for model, raw in MODELS.items() for s in PREFILL_SEQLENS
                if s <= raw["max_position_embeddings"]]

    return cases


# ----------------------------------------------------------------------------- work


def _config(case: Case):
    """The case's model as tritium.models reads its config.json (a DecoderConfig)."""
    raw = SHAPES[case.params["model"]]
    return MODEL_TYPES[raw["model_type"]][0](raw)


def _layer_weights(c) -> int:
    """Linear weights of one decoder layer (biases and norms are noise beside them)."""
    h, d = c.hidden_size, c.head_dim
    return 2 * h * d * (c.num_attention_heads + c.num_key_value_heads) + 3 * h * c.intermediate_size


def _pairs(c, layer: int, start: int, queries: int) -> int:
    """Visible (query, key) pairs of `queries` queries from position `start`: causal, within
    the layer's sliding window."""
    left = c.window(layer)[0]

    def upto(n: int) -> int:  # queries 0..n-1, query q sees min(q + 1, window) keys
        if left < 0 or n <= left + 1:
            return n * (n + 1) // 2
        return (left + 1) * (left + 2) // 2 + (n - left - 1) * (left + 1)

    return upto(start + queries) - upto(start)


def model_flops(case: Case, mode: str) -> float:
    """GEMM flops of the layers and of the kept logits, plus attention over every visible
    (query, key) pair."""
    c, p = _config(case), case.params
    start, queries = (0, p["tokens"]) if p["kind"] == "prefill" else (p["tokens"], 1)
    attention = sum(4 * c.num_attention_heads * c.head_dim * _pairs(c, layer, start, queries)
                    for layer in range(c.num_hidden_layers))
    gemms = 2 * c.num_hidden_layers * _layer_weights(c) * queries
    logits = 2 * c.hidden_size * c.vocab_size * min(LOGITS_KEPT, queries)
    return p["batch"] * (gemms + attention + logits)


def model_bytes(case: Case, mode: str) -> float:
    """The layer weights (NF4: 4 bits and a float32 absmax per 64) and the LM head read
    once; in decode also the keys and values each layer attends to."""
    c, p = _config(case), case.params
    size = getattr(torch, p["dtype"]).itemsize
    per_weight = 0.5 + 4 / BLOCKSIZE if p["nf4"] else size
    weights = c.num_hidden_layers * _layer_weights(c) * per_weight + c.hidden_size * c.vocab_size * size
    if p["kind"] == "prefill":
        return weights
    keys = sum(_pairs(c, layer, p["tokens"], 1) for layer in range(c.num_hidden_layers))
    return weights + 2 * c.num_key_value_heads * c.head_dim * keys * p["batch"] * size


# ----------------------------------------------------------------------------- models


def _inputs(case: Case, device: str) -> dict:
    """Token ids ((batch, tokens), plus the decode token) and the case's models, built by
    the backends that use them."""
    p = case.params
    raw = SHAPES[p["model"]]
    if torch.device(device).type == "cuda":
        # A previous case's compiled step (hf-static-compiled) would keep its model alive, and
        # each case's compiles must not use up dynamo's recompile limit.
        torch._dynamo.reset()
    length = p["tokens"] + (p["kind"] == "decode")
    ids = torch.randint(0, raw["vocab_size"], (p["batch"], length), device=device)
    return {"ids": ids, "models": Models(raw, getattr(torch, p["dtype"]), device)}


class Models:
    """The models of one case, made on demand from one seeded set of random weights.

    get(kind) builds what `kind` needs and drops every other model, so a row's peak memory
    counts its own backend's model; one dropped is rebuilt identically when asked again.
    Kinds: "tritium" (the compact model, which holds the weights), "hf" (transformers,
    sharing the compact model's tensors), "tritium-nf4", "hf-bnb-nf4" and
    "hf-eager-dequantized" (transformers with the NF4 weights dequantized)."""

    def __init__(self, raw: dict, dtype: torch.dtype, device):
        self.raw, self.dtype, self.device = raw, dtype, torch.device(device)
        self.built: dict[str, nn.Module] = {}

    def get(self, kind: str) -> nn.Module:
        keep = ("tritium", "hf") if kind == "hf" else (kind,)
        for name in keep:
            if name not in self.built:
                self.built[name] = self._build(name)
        for name in set(self.built) - set(keep):
            del self.built[name]
        return self.built[kind]

    def _build(self, kind: str) -> nn.Module:
        if kind == "tritium":
            return self._random()
        if kind == "hf-bnb-nf4" and self.device.type != "cuda":
            # Where the CPU has AVX512-BF16, its Linear4bit computes in bfloat16 whatever the compute dtype.
            raise Unsupported("bitsandbytes' NF4 is benchmarked on CUDA only")
        dense = self.built.get("tritium") or self._random()
        if kind == "tritium-nf4":
            return _quantized(dense)
        if kind == "hf":
            return self._transformers(dense)
        if kind == "hf-eager-dequantized":
            return _dequantize_layers(self._transformers(dense))
        from transformers import BitsAndBytesConfig

        return self._transformers(dense, BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                            bnb_4bit_use_double_quant=DOUBLE_QUANT,
                                                            bnb_4bit_compute_dtype=self.dtype))

    def _random(self) -> nn.Module:
        """The compact model with weights normal(0, STD); RMSNorm scales 1 + normal(0, STD)."""
        config_from_hf, model_class = MODEL_TYPES[self.raw["model_type"]]
        model = model_class(config_from_hf(self.raw), dtype=self.dtype, device=self.device)
        means = {id(m.weight): 1.0 - m.offset for m in model.modules() if isinstance(m, RMSNorm)}
        generator = torch.Generator(self.device).manual_seed(SEED)
        with torch.no_grad():
            for weight in model.parameters():
                weight.normal_(means.get(id(weight), 0.0), STD, generator=generator)
        return model.eval()

    def _transformers(self, dense: nn.Module, quantization=None) -> nn.Module:
        """transformers' model of the family holding `dense`'s tensors (quantized by
        `quantization`, a BitsAndBytesConfig, when given)."""
        import transformers

        config = transformers.AutoConfig.for_model(**self.raw)
        model_class = getattr(transformers, HF_CLASSES[self.raw["model_type"]])
        with no_progress_bar():
            model = model_class.from_pretrained(None, config=config, state_dict=_shared_state(dense), dtype=self.dtype,
                                                device_map=self.device, quantization_config=quantization)
        return model.eval()


def _shared_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """model's tensors under transformers' names, shared: state_dict() would copy Gemma's
    gate_proj and up_proj out of the fused gate_up_proj, here they are views of it."""
    state = {}
    for name, tensor in model.named_parameters(remove_duplicate=False):
        if name.endswith(".mlp.gate_up_proj.weight") and not model.FUSED_GATE_UP:
            prefix = name.removesuffix("gate_up_proj.weight")
            state[prefix + "gate_proj.weight"], state[prefix + "up_proj.weight"] = tensor.detach().chunk(2)
        else:
            state[name] = tensor.detach()
    return state


def _quantized(dense: nn.Module) -> nn.Module:
    """The compact model with NF4 decoder layers holding `dense`'s weights, quantized as
    tritium.models.load(..., quantization="nf4") quantizes a checkpoint."""
    model = type(dense)(dense.config, quantization="nf4", dtype=dense.dtype, device=dense.device)
    linears = {f"{name}.weight" for name, m in model.named_modules() if isinstance(m, NF4Linear)}
    state = {}
    for key, tensor in dense.state_dict().items():
        state.update(weight_state_dict(_nf4(tensor), key) if key in linears else {key: tensor})
    model.load_state_dict(state)
    return model.eval()


def _dequantize_layers(model: nn.Module) -> nn.Module:
    """transformers' `model` with each decoder-layer linear weight replaced by its NF4
    quantization dequantized to the model dtype (new tensors: the dense ones are not kept)."""
    for module in model.model.layers.modules():
        if isinstance(module, nn.Linear):
            weight = module.weight.detach()
            module.weight = nn.Parameter(nf4.dequantize(_nf4(weight), weight.dtype), requires_grad=False)
    return model


def _nf4(weight: torch.Tensor) -> nf4.NF4Weight:
    return nf4.quantize(weight, BLOCKSIZE, DOUBLE_QUANT)


# ----------------------------------------------------------------------------- accuracy


def _error(nf4_weights: bool):
    def error(case: Case, t: dict, outputs: tuple, grad_out) -> float:
        """Max abs error of the logits against float64, on the first REFERENCE_ROWS rows."""
        expected = _reference(case, t, nf4_weights)
        return (outputs[0][: expected.shape[0]].double() - expected).abs().max().item()

    return error


def _reference(case: Case, t: dict, nf4_weights: bool) -> torch.Tensor:
    """The logits of transformers' model in float64 under eager, once per case (the decode
    reference is the prefill of context + 1 tokens: its last position is what the decode
    step computes); with nf4_weights, of the NF4 weights dequantized."""
    key = "reference-nf4" if nf4_weights else "reference"
    if key not in t:
        model = t["models"].get("hf")
        _attention(model, "eager")
        ids = t["ids"][:REFERENCE_ROWS]
        with torch.no_grad(), _float64(model, _dequantized if nf4_weights else None):
            if case.params["kind"] == "prefill":
                t[key] = model(input_ids=ids, logits_to_keep=LOGITS_KEPT, use_cache=False).logits
            else:
                t[key] = model(input_ids=ids, logits_to_keep=1, use_cache=False).logits[:, -1]
    return t[key]


def _dequantized(weight: torch.Tensor) -> torch.Tensor:
    return nf4.dequantize(_nf4(weight), torch.float32).double()


@contextlib.contextmanager
def _float64(model: nn.Module, linear_weight: Callable | None = None):
    """transformers' `model` computing in float64 inside the block: its embeddings, final
    norm, LM head and rotary throughout, each decoder layer only while it runs (a 9B
    model's float64 copy would not fit beside it), with its nn.Linear weights replaced by
    linear_weight(weight) when given. The model's own tensors (shared with the compact
    model) are put back untouched."""
    layers = list(model.model.layers)
    inside = {id(m) for layer in layers for m in layer.modules()}
    restore = _widen([m for m in model.modules() if id(m) not in inside])
    pending = {}
    hooks = [layer.register_forward_pre_hook(lambda m, args: pending.update({m: _widen(m.modules(), linear_weight)}))
             for layer in layers]
    hooks += [layer.register_forward_hook(lambda m, args, out: pending.pop(m)()) for layer in layers]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()
        for undo in (*pending.values(), restore):
            undo()


def _widen(modules, linear_weight: Callable | None = None) -> Callable[[], None]:
    """Give each of `modules` float64 copies of its own floating parameters and buffers (one
    copy of a tensor two of them share); returns the function putting the originals back."""
    saved, copies = [], {}
    for module in modules:
        for tensors in (module._parameters, module._buffers):
            for name, tensor in tensors.items():
                if tensor is None or not tensor.is_floating_point():
                    continue
                if id(tensor) not in copies:
                    linear = linear_weight is not None and isinstance(module, nn.Linear) and name == "weight"
                    wide = linear_weight(tensor.detach()) if linear else tensor.detach().double()
                    copies[id(tensor)] = nn.Parameter(wide, requires_grad=False) if isinstance(
                        tensor, nn.Parameter) else wide
                saved.append((tensors, name, tensor))
                tensors[name] = copies[id(tensor)]

    def restore():
        for tensors, name, tensor in saved:
            tensors[name] = tensor

    return restore


# ----------------------------------------------------------------------------- backends


def _attention(model: nn.Module, implementation: str | None) -> None:
    """Switch transformers' `model` to `implementation` (None: its best exact one, sdpa, or
    eager where attention logits are capped)."""
    softcap = getattr(model.config, "attn_logit_softcapping", None)
    implementation = implementation or ("eager" if softcap else "sdpa")
    if implementation == "sdpa" and softcap:
        raise Unsupported(f"SDPA cannot apply the attention softcap ({softcap:g}) of {type(model).__name__}")
    try:
        model.set_attn_implementation(implementation)
    except ValueError as exc:  # transformers refuses an implementation the model does not support
        raise Unsupported(str(exc).split(". ")[0]) from exc


def _cache_argument(model: nn.Module) -> str:
    """transformers' name for the cache argument: `cache` (5.24), formerly `past_key_values`,
    which 5.24 still takes with a deprecation warning."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _tritium_prefill(kind: str):
    def setup(case: Case, t: dict):
        model, ids = t["models"].get(kind), t["ids"]

        def run():
            with torch.no_grad():
                return model(ids, logits_to_keep=LOGITS_KEPT).logits

        return run

    return setup


def decode_step(model: nn.Module, ids: torch.Tensor) -> Callable[[], torch.Tensor]:
    """A compact decoder's decode step as generate runs it (replayed from a CUDA graph on
    CUDA): the last token of ids (batch, context + 1) after the others, prefilled here; each
    call rewinds the cache first, so every call computes the same step. Returns the
    step's logits (batch, vocab)."""
    batch, context = ids.shape[0], ids.shape[1] - 1
    cache = model.new_cache(batch, context + 1)
    with torch.no_grad():
        model(ids[:, :-1], cache=cache, logits_to_keep=1)

    def eager(tokens, positions):
        return model(tokens, position_ids=positions, cache=cache, logits_to_keep=1).logits[:, -1]

    step = CapturedStep(eager, cache, batch, ids.device) if ids.is_cuda else eager
    tokens, positions = ids[:, -1:], torch.full((batch, 1), context, device=ids.device)

    def run():
        # The step writes row `context` of the cache only: rewinding the length restores it.
        cache.length = context
        cache.lengths.fill_(context)
        with torch.no_grad():
            return step(tokens, positions)

    return run


def _tritium_decode(kind: str):
    def setup(case: Case, t: dict):
        return decode_step(t["models"].get(kind), t["ids"])

    return setup


def _hf_prefill(kind: str, implementation: str | None):
    def setup(case: Case, t: dict):
        model, ids = t["models"].get(kind), t["ids"]
        _attention(model, implementation)

        def run():
            with torch.no_grad():
                return model(input_ids=ids, logits_to_keep=LOGITS_KEPT, use_cache=False).logits

        return run

    return setup


def hf_decode_step(model: nn.Module, ids: torch.Tensor, implementation: str | None) -> Callable[[], torch.Tensor]:
    """transformers' decode step as its generate runs it by default (a DynamicCache), under
    `implementation` (None: as built); as decode_step, each call computes the same step."""
    from transformers import DynamicCache

    _attention(model, implementation)
    cache = {_cache_argument(model): DynamicCache(config=model.config)}
    with torch.no_grad():
        model(input_ids=ids[:, :-1], logits_to_keep=1, **cache)
    saved = snapshot_cache(next(iter(cache.values())))

    def run():
        # Each step concatenates new tensors: putting the old ones back restores the cache.
        restore_cache(next(iter(cache.values())), saved)
        with torch.no_grad():
            return model(input_ids=ids[:, -1:], **cache).logits[:, -1]

    return run


def _hf_decode(kind: str, implementation: str | None):
    def setup(case: Case, t: dict):
        return hf_decode_step(t["models"].get(kind), t["ids"], implementation)

    return setup


def _hf_static_compiled(case: Case, t: dict):
    from transformers import StaticCache

    if not t["ids"].is_cuda:
        raise Unsupported("torch.compile(mode='reduce-overhead') replays CUDA graphs: benchmarked on CUDA only")
    model, ids = t["models"].get("hf"), t["ids"]
    _attention(model, None)
    batch, context = ids.shape[0], ids.shape[1] - 1
    window = getattr(model.config, "sliding_window", None)
    if window and context >= window:
        raise Unsupported(f"transformers' static cache rolls a full sliding window ({window} positions) at every step: "
                          f"after {context} tokens a timed step cannot be repeated from one state")
    cache = {_cache_argument(model): StaticCache(config=model.config, max_cache_len=context + 1)}
    with torch.no_grad():
        model(input_ids=ids[:, :-1], logits_to_keep=1, **cache)
    layers = next(iter(cache.values())).layers
    lengths = [layer.cumulative_length for layer in layers]  # 0-d tensors the compiled step reads and advances
    if not all(torch.is_tensor(length) for length in lengths):
        raise Unsupported("this transformers' StaticCache counts its length otherwise: a step cannot be rewound")
    forward = torch.compile(model.forward, mode="reduce-overhead")
    tokens, positions = ids[:, -1:], torch.full((batch, 1), context, device=ids.device)

    def run():
        # The step writes row `context` of every layer (within its window): rewinding the lengths
        # restores the cache, in two launches for all layers (one each would weigh on a small step).
        torch._foreach_zero_(lengths)
        torch._foreach_add_(lengths, context)
        for layer in layers:
            if hasattr(layer, "cumulative_length_int"):  # sliding layers track a Python int too
                layer.cumulative_length_int = context
        torch.compiler.cudagraph_mark_step_begin()
        with torch.no_grad():
            return forward(input_ids=tokens, position_ids=positions, logits_to_keep=1, **cache).logits[:, -1]

    return run


# ----------------------------------------------------------------------------- operators


def _operator(kind: str, nf4_weights: bool, backends: tuple[Backend, ...]) -> Operator:
    baseline, reference = ("hf-bnb-nf4", "hf-eager-dequantized") if nf4_weights else ("hf-eager", "hf-eager")
    decode = kind == "decode"
    return Operator(name=f"models_{kind}" + "_nf4" * nf4_weights, suite=SUITE, modes=(kind,),
                    cases=_cases(kind, nf4_weights), inputs=_inputs, backends=backends,
                    baseline={"cuda": baseline, "cpu": reference}, flops=model_flops, nbytes=model_bytes,
                    error=_error(nf4_weights), accuracy_reference=reference,
                    headline="gbps" if decode else "tflops", x_name="batch" if decode else "seqlen")


register(_operator("prefill", False, (
    Backend("hf-eager", _hf_prefill("hf", "eager")), Backend("hf-sdpa", _hf_prefill("hf", "sdpa")),
    Backend("tritium", _tritium_prefill("tritium")))))
register(_operator("decode", False, (
    Backend("hf-eager", _hf_decode("hf", "eager")), Backend("hf-sdpa", _hf_decode("hf", "sdpa")),
    Backend("hf-static-compiled", _hf_static_compiled), Backend("tritium", _tritium_decode("tritium")))))
register(_operator("prefill", True, (
    Backend("hf-bnb-nf4", _hf_prefill("hf-bnb-nf4", None)),
    Backend("hf-eager-dequantized", _hf_prefill("hf-eager-dequantized", "eager")),
    Backend("tritium", _tritium_prefill("tritium-nf4")))))
register(_operator("decode", True, (
    Backend("hf-bnb-nf4", _hf_decode("hf-bnb-nf4", None)),
    Backend("hf-eager-dequantized", _hf_decode("hf-eager-dequantized", "eager")),
    Backend("tritium", _tritium_decode("tritium-nf4")))))

# The encoder-decoders' rows of this suite.
import tritium.bench.models_seq2seq  # noqa: E402,F401
