"""A decoder checkpoint's config.json as one dataclass: what the compact decoders (Gemma 2,
Gemma 3 text, GLM-4) need, with transformers' defaults where a file leaves a field out.
Each family file turns its own config.json into a `DecoderConfig`; this file holds what
they share (field reading, rope parameters old and new)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from tritium.models.mlp import activation_from_hf


@dataclass(frozen=True)
class Rope:
    """Rotary parameters of one layer type: inv_freq = 1 / theta^(2i / rotary_dim) / factor
    ("default" rope has factor 1, "linear" scaling divides positions by factor)."""

    theta: float
    factor: float = 1.0


@dataclass
class DecoderConfig:
    """Architecture of a compact decoder, in transformers' terms (see each family file for
    how its config.json maps here)."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    activation: str  # tritium's name ("gelu_tanh", "silu")
    max_position_embeddings: int
    rms_norm_eps: float
    norm_offset: float  # 1.0: Gemma's RMSNorm (scale 1 + w, float32 product); 0.0: Llama/GLM-4's
    tie_word_embeddings: bool
    attention_bias: bool
    softmax_scale: float
    layer_types: list[str]  # per layer: "full_attention" or "sliding_attention"
    rope: dict[str, Rope]  # per layer type
    rotary_dim: int
    interleaved_rotary: bool = False
    sliding_window: int | None = None
    attn_softcap: float = 0.0  # 0 = none
    final_softcap: float = 0.0
    scale_embeddings: bool = False  # Gemma: embeddings times sqrt(hidden_size), in the model dtype
    qk_norm: bool = False  # Gemma 3: RMSNorm of each q and k head before rotary
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)

    def window(self, layer: int) -> tuple[int, int]:
        """The kernels' window_size of `layer`: (sliding_window - 1, 0) on sliding layers
        (transformers' key j visible iff q - W < j <= q), else unbounded."""
        if self.layer_types[layer] == "sliding_attention" and self.sliding_window:
            return (self.sliding_window - 1, 0)
        return (-1, -1)


def read_json(path: Path | None) -> dict:
    """The JSON object in `path` ({} for None); ValueError naming the file otherwise."""
    if path is None:
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def ids(value) -> list[int]:
    """A token id field (None, an int or a list of ints) as a list."""
    if value is None:
        return []
    return [value] if isinstance(value, int) else [int(v) for v in value]


def rope_of(raw: dict, defaults: dict[str, float], local_key: str | None = None) -> tuple[dict[str, Rope], float]:
    """Per layer type Rope, and the partial rotary factor, from either config.json format:
    transformers >= 5 writes `rope_parameters` (flat, or nested per layer type); older
    files write `rope_theta`, `rope_scaling` and `partial_rotary_factor` at the top level,
    and Gemma 3 the sliding layers' base as `local_key` ("rope_local_base_freq").
    defaults: transformers' theta per layer type, for a file that gives none."""
    params = raw.get("rope_parameters") or {}
    nested = any(key in params for key in ("full_attention", "sliding_attention"))
    partial = float((params if not nested else {}).get("partial_rotary_factor", raw.get("partial_rotary_factor", 1.0)))
    rope = {}
    for layer_type, default in defaults.items():
        if nested:
            spec = dict(params.get(layer_type) or {})
        elif layer_type == "sliding_attention" and local_key:
            spec = {"rope_theta": raw.get(local_key, default)}
        else:
            spec = {"rope_theta": raw.get("rope_theta", default), **params, **(raw.get("rope_scaling") or {})}
        kind = spec.get("rope_type", spec.get("type", "default"))
        if kind not in ("default", "linear"):
            raise ValueError(f"config.json: {layer_type} layers use rope_type {kind!r}; tritium's compact models "
                             "support 'default' and 'linear'")
        factor = float(spec.get("factor", 1.0)) if kind == "linear" else 1.0
        rope[layer_type] = Rope(float(spec.get("rope_theta", default)), factor)
    if not 0 < partial <= 1:
        raise ValueError(f"config.json: partial_rotary_factor must be in (0, 1], got {partial}")
    return rope, partial


def positive(raw: dict, name: str, default=None) -> int:
    value = raw.get(name, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"config.json: {name} must be a positive int, got {value!r}")
    return value


def common_fields(raw: dict, *, head_dim_default: bool = True) -> dict:
    """The fields every decoder shares, checked: sizes positive, heads a multiple of kv heads."""
    hidden, heads = positive(raw, "hidden_size"), positive(raw, "num_attention_heads")
    kv_heads = positive(raw, "num_key_value_heads", heads)
    if heads % kv_heads:
        raise ValueError(f"config.json: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")
    head_dim = raw.get("head_dim") or (hidden // heads if head_dim_default else None)
    return dict(
        model_type=raw["model_type"], vocab_size=positive(raw, "vocab_size"), hidden_size=hidden,
        intermediate_size=positive(raw, "intermediate_size"), num_hidden_layers=positive(raw, "num_hidden_layers"),
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=positive({"head_dim": head_dim}, "head_dim"),
        max_position_embeddings=positive(raw, "max_position_embeddings"),
        attention_bias=bool(raw.get("attention_bias", False)),
        pad_token_id=raw.get("pad_token_id"), bos_token_id=raw.get("bos_token_id"),
        eos_token_ids=ids(raw.get("eos_token_id")),
    )


def activation(raw: dict, *names: str, default: str) -> str:
    """tritium's activation from the first of `names` config.json sets (transformers' name)."""
    for name in names:
        if raw.get(name):
            return activation_from_hf(raw[name])
    return activation_from_hf(default)


def softcap(value) -> float:
    if value is None:
        return 0.0
    if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"config.json: a softcap must be null or a finite number >= 0, got {value!r}")
    return float(value)
