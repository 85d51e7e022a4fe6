"""NF4Linear: nn.Linear with its weight frozen in NF4, in bitsandbytes' Linear4bit format,
so checkpoints saved by transformers with BitsAndBytesConfig(load_in_4bit=True,
bnb_4bit_quant_type="nf4") load unchanged and what it saves loads back into them.

The serialization (bitsandbytes' QuantState.as_dict(packed=True), under the layer's
"weight" key): `weight` (packed uint8 codes), `weight.absmax`, `weight.quant_map`, with
double quantization `weight.nested_absmax` and `weight.nested_quant_map`, and
`weight.quant_state.bitsandbytes__nf4`: a JSON dict (quant_type, blocksize, dtype, shape,
nested_blocksize, nested_dtype, nested_offset) as uint8 bytes.
"""

from __future__ import annotations

import json

import torch
from torch import nn

from tritium.kernels import nf4
from tritium.kernels.nf4 import NESTED_BLOCKSIZE, NF4Weight, check_blocksize

QUANT_STATE = ".quant_state.bitsandbytes__"
# (state dict suffix, NF4Weight field) of the tensors; "" is the packed codes themselves.
TENSORS = (("", "packed"), (".absmax", "absmax"), (".quant_map", "code"), (".nested_absmax", "absmax2"),
           (".nested_quant_map", "code2"))
STATE_SUFFIXES = {suffix for suffix, _ in TENSORS[1:]} | {QUANT_STATE + "nf4", QUANT_STATE + "fp4"}


def weight_state_dict(w: NF4Weight, key: str = "weight") -> dict[str, torch.Tensor]:
    """bitsandbytes' packed serialization of `w` under `key`, byte for byte (same keys,
    same JSON). Reads the offset to the host when double-quantized."""
    entries = {key + suffix: getattr(w, field) for suffix, field in TENSORS if getattr(w, field) is not None}
    meta = {"quant_type": "nf4", "blocksize": w.blocksize, "dtype": str(w.dtype)[6:], "shape": list(w.shape)}
    if w.double_quant:
        meta.update(nested_blocksize=NESTED_BLOCKSIZE, nested_dtype="float32", nested_offset=w.offset.item())
    entries[key + QUANT_STATE + "nf4"] = torch.tensor(list(json.dumps(meta).encode()), dtype=torch.uint8)
    return entries


def weight_from_state_dict(state_dict: dict, key: str = "weight") -> NF4Weight:
    """The NF4Weight serialized under `key` (see the module docstring); its tensors are
    used as they are when contiguous, else copied once. Raises KeyError for a missing
    entry, ValueError naming the entry for any other malformed state: another quant type,
    quant-state bytes that are not a JSON object of the fields bitsandbytes writes (each of
    its type, shape sizes >= 0, blocksize one bitsandbytes allows), tensors that are not
    tensors or do not fit the shape."""
    found = [k for k in state_dict if k.startswith(key + QUANT_STATE)]
    if len(found) != 1:
        raise KeyError(f"{key}: expected one '{key}{QUANT_STATE}nf4' entry (bitsandbytes' quant state), found {found}")
    meta = _quant_state(found[0], state_dict[found[0]], key)
    tensors = {}
    for suffix, field in TENSORS:
        if suffix.startswith(".nested") and "nested_offset" not in meta:
            continue
        if key + suffix not in state_dict:
            raise KeyError(f"{key + suffix}: missing from the state dict")
        tensor = state_dict[key + suffix]
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"{key + suffix}: expected a torch.Tensor, got {type(tensor).__name__}")
        tensors[field] = tensor.contiguous()
    packed = tensors["packed"]
    if packed.dtype != torch.uint8:  # bnb_4bit_quant_storage (FSDP) stores the same bytes as another dtype
        tensors["packed"] = packed.reshape(-1).view(torch.uint8).reshape(-1, 1)
    if "nested_offset" in meta:
        tensors["offset"] = torch.tensor(float(meta["nested_offset"]), dtype=torch.float32, device=packed.device)
    try:
        return NF4Weight(blocksize=meta["blocksize"], shape=tuple(meta["shape"]), dtype=getattr(torch, meta["dtype"]),
                         **tensors)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{key}: the checkpoint's tensors do not fit its quant state: {error}") from error


_DTYPES = ("float16", "bfloat16", "float32")


def _quant_state(name: str, raw, key: str) -> dict:
    """The quant-state dict of entry `name` (bitsandbytes' JSON as uint8 bytes) of the
    weight under `key`: nf4, and each field bitsandbytes writes of its type and range;
    ValueError naming the entry otherwise."""
    if not isinstance(raw, torch.Tensor) or raw.dtype != torch.uint8:
        raise ValueError(f"{name}: expected the quant state as uint8 bytes of JSON, got "
                         f"{raw.dtype if isinstance(raw, torch.Tensor) else type(raw).__name__}")
    try:
        meta = json.loads(bytes(raw.reshape(-1).tolist()).decode("utf-8"))
    except UnicodeDecodeError as error:
        raise ValueError(f"{name}: the quant state is not UTF-8 text ({error})") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{name}: the quant state is not JSON ({error})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{name}: expected the quant state to be a JSON object, got {type(meta).__name__}")

    def bad(field: str, expected: str):
        return ValueError(f"{name}: {field}: expected {expected}, got {meta.get(field)!r}")

    if not isinstance(meta.get("quant_type", "nf4"), str):
        raise bad("quant_type", "a string")
    other = {name[len(key + QUANT_STATE):], meta.get("quant_type", "nf4")} - {"nf4"}
    if other:
        quant_type = other.pop()
        raise ValueError(f"{key}: bitsandbytes quant_type {quant_type!r}: {quant_type} is not supported, only nf4")
    try:
        check_blocksize(meta.get("blocksize"))
    except ValueError as error:
        raise ValueError(f"{name}: {error}") from None
    shape = meta.get("shape")
    if (not isinstance(shape, list) or not shape
            or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape)):
        raise bad("shape", "a non-empty list of sizes >= 0")
    if meta.get("dtype") not in _DTYPES:
        raise bad("dtype", " or ".join(repr(d) for d in _DTYPES))
    if "nested_offset" in meta:
        offset = meta["nested_offset"]
        if not isinstance(offset, (int, float)) or isinstance(offset, bool):
            raise bad("nested_offset", "a number")
        if meta.get("nested_blocksize") != NESTED_BLOCKSIZE:
            raise ValueError(f"{name}: nested_blocksize {meta.get('nested_blocksize')!r} is not supported, only "
                             f"{NESTED_BLOCKSIZE} (what bitsandbytes writes)")
        if meta.get("nested_dtype", "float32") != "float32":
            raise bad("nested_dtype", "'float32' (what bitsandbytes writes)")
    return meta


def _bits(t: torch.Tensor | None) -> torch.Tensor | None:
    # float32 state kept as int32 bits: module.to(torch.bfloat16) / .half() convert every
    # floating buffer, which would round absmax and the code tables.
    return t.view(torch.int32) if t is not None and t.dtype == torch.float32 else t


def _floats(t: torch.Tensor | None) -> torch.Tensor | None:
    return t.view(torch.float32) if t is not None and t.dtype == torch.int32 else t


def _zeros(shape: tuple, blocksize: int, double_quant: bool, dtype: torch.dtype, device) -> NF4Weight:
    """An all-zero NF4 weight: the placeholder a checkpoint's state replaces."""
    numel = shape[0] * shape[1]
    blocks = -(-numel // blocksize)
    zeros = lambda n, dt: torch.zeros(n, dtype=dt, device=device)  # noqa: E731
    packed = zeros(((numel + 1) // 2, 1), torch.uint8)
    if not double_quant:
        return NF4Weight(packed, zeros(blocks, torch.float32), blocksize, shape, dtype, nf4.nf4_code(device))
    return NF4Weight(packed, zeros(blocks, torch.uint8), blocksize, shape, dtype, nf4.nf4_code(device),
                     zeros(-(-blocks // NESTED_BLOCKSIZE), torch.float32), nf4.dynamic_map(device),
                     zeros((), torch.float32))


class NF4Linear(nn.Module):
    """y = x @ W^T + bias with W (out_features, in_features) frozen in NF4 and computed by
    tritium.nf4.matmul; gradients flow to x and bias (QLoRA). Built empty like nn.Linear
    (then filled by load_state_dict from a bitsandbytes/transformers checkpoint), or by
    `from_linear` / `from_state_dict`. The bias is cast to the input's dtype, as
    bitsandbytes' Linear4bit does."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, blocksize: int = 64,
                 double_quant: bool = True, dtype: torch.dtype = torch.bfloat16, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self._set_weight(_zeros((out_features, in_features), blocksize, double_quant, dtype, device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, blocksize: int = 64, double_quant: bool = True) -> "NF4Linear":
        """Quantize `linear`'s weight (bit-identical to bitsandbytes); its bias is copied."""
        weight = nf4.quantize(linear.weight.detach(), blocksize, double_quant)
        return cls._from_weight(weight, None if linear.bias is None else linear.bias.detach().clone())

    @classmethod
    def from_state_dict(cls, state_dict: dict, prefix: str = "") -> "NF4Linear":
        """The layer serialized under `prefix` (e.g. "model.layers.0.mlp.down_proj.") in a
        transformers/bitsandbytes 4-bit checkpoint; its tensors are used, not copied."""
        bias = state_dict.get(prefix + "bias")
        return cls._from_weight(weight_from_state_dict(state_dict, prefix + "weight"), bias)

    @classmethod
    def _from_weight(cls, weight: NF4Weight, bias: torch.Tensor | None) -> "NF4Linear":
        if len(weight.shape) != 2:
            raise ValueError(f"weight: expected a 2-d (out_features, in_features) weight, got shape {weight.shape}")
        out_features, in_features = weight.shape
        module = cls(in_features, out_features, bias is not None, blocksize=weight.blocksize,
                     double_quant=weight.double_quant, dtype=weight.dtype, device="meta")
        module._set_weight(weight)
        if bias is not None:
            module.bias = nn.Parameter(bias)
        return module

    def _set_weight(self, w: NF4Weight) -> None:
        self.register_buffer("weight", w.packed)  # the only persistent one: it is the "weight" key
        for name, field in (("absmax", "absmax"), ("quant_map", "code"), ("nested_absmax", "absmax2"),
                            ("nested_quant_map", "code2"), ("nested_offset", "offset")):
            self.register_buffer(name, _bits(getattr(w, field)), persistent=False)
        self.blocksize, self.weight_dtype = w.blocksize, w.dtype

    @property
    def quantized(self) -> NF4Weight:
        """The layer's weight as an NF4Weight (views of the module's buffers)."""
        return NF4Weight(self.weight, _floats(self.absmax), self.blocksize, (self.out_features, self.in_features),
                         self.weight_dtype, _floats(self.quant_map), _floats(self.nested_absmax),
                         _floats(self.nested_quant_map), _floats(self.nested_offset))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return nf4.matmul(x, self.quantized, bias)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination.update(weight_state_dict(self.quantized, prefix + "weight"))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        key = prefix + "weight"
        # "weight.absmax" and the like name no submodule: the base class reports them as
        # unexpected, so the ones read here are taken off its list.
        consumed = [k for k in state_dict if k.startswith(key + ".") and k[len(key):] in STATE_SUFFIXES]
        if any(k.startswith(key + QUANT_STATE) for k in state_dict):
            weight = weight_from_state_dict(state_dict, key)
            if weight.shape != (self.out_features, self.in_features):
                raise ValueError(f"{key}: the checkpoint holds a {weight.shape} weight, this layer is "
                                 f"({self.out_features}, {self.in_features})")
            # A layer built on the meta device (a model filled in place) takes the tensors where they are.
            self._set_weight(weight if self.weight.is_meta else weight.to(self.weight.device))
            state_dict[key] = self.weight  # (load_state_dict's own copy) the uint8 view the base class copies
        elif key in state_dict:
            raise ValueError(f"{key}: no bitsandbytes quant state ('{key}{QUANT_STATE}nf4') in the state dict; "
                             "a dense weight is quantized with NF4Linear.from_linear")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        unexpected_keys[:] = [k for k in unexpected_keys if k not in consumed]

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"blocksize={self.blocksize}, double_quant={self.nested_absmax is not None}")
