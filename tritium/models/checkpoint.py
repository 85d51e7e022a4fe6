"""Checkpoint weights into a model built on the meta device: safetensors shards (single file
or index) read straight to the target device and dtype, each tensor becoming the model's
parameter (no second copy), every missing, unexpected or mis-shaped tensor reported in one
error before anything is read. Pickle checkpoints (.bin) only on explicit opt-in.

NF4: a bitsandbytes 4-bit checkpoint (transformers' BitsAndBytesConfig(load_in_4bit=True,
bnb_4bit_quant_type="nf4")) loads as it is; with quantize=True the dense linear weights of
a float checkpoint are quantized one by one as they are read."""

from __future__ import annotations

import re

import torch
from torch import nn

from tritium.kernels import nf4
from tritium.models.config import read_json
from tritium.models.hub import CheckpointFiles
from tritium.models.nf4_linear import QUANT_STATE, STATE_SUFFIXES, NF4Linear, weight_state_dict

SAFETENSORS, SAFETENSORS_INDEX = "model.safetensors", "model.safetensors.index.json"
PICKLE, PICKLE_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"
SHOWN = 8  # keys named per category in an error
LAYER = re.compile(r"^.*?\.layers\.\d+\.")


def weight_files(files: CheckpointFiles, *, allow_pickle: bool = False) -> list:
    """Local paths of the checkpoint's weight files (downloading only those): the shards its
    index lists, else its single file. safetensors first; pickle files only when allowed."""
    for single, index, pickled in ((SAFETENSORS, SAFETENSORS_INDEX, False), (PICKLE, PICKLE_INDEX, True)):
        index_path = files.get(index, required=False)
        paths = None
        if index_path is not None:
            weight_map = read_json(index_path).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise ValueError(f"{files.name}: {index} has no weight_map")
            paths = sorted(set(weight_map.values()))
        elif files.get(single, required=False) is not None:
            paths = [single]
        if paths is None:
            continue
        if pickled and not allow_pickle:
            raise ValueError(f"{files.name} holds its weights as pickle ({paths[0]}), which can run code when loaded; "
                             "convert it to safetensors, or pass allow_pickle=True if you trust its source")
        return [files.get(path) for path in paths]
    raise FileNotFoundError(f"{files.name}: no weights found ({SAFETENSORS}, {SAFETENSORS_INDEX}, or with "
                            f"allow_pickle=True {PICKLE})")


class Reader:
    """Shapes and tensors of a set of weight files, by the model's key for each.

    renames: (pattern, replacement) regex substitutions from the checkpoint's names to the
    model's, applied in order; unused: patterns of checkpoint names the model does not use
    (a BERT checkpoint's pooler), left out and listed in `unused`."""

    def __init__(self, paths: list, device: torch.device, renames=(), unused=()):
        self.device, self.where, self.shapes, self.pickled, self.unused = device, {}, {}, {}, []
        from safetensors import safe_open

        for path in paths:
            if str(path).endswith(".bin"):
                tensors = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
                self.pickled.update(tensors)
                shapes = {key: tuple(t.shape) for key, t in tensors.items()}
            else:
                with safe_open(str(path), framework="pt") as f:
                    shapes = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
            for key, shape in shapes.items():
                if any(re.search(pattern, key) for pattern in unused):
                    self.unused.append(key)
                    continue
                ours = key
                for pattern, replacement in renames:
                    ours = re.sub(pattern, replacement, ours)
                self.where.setdefault(ours, (path, key))
                self.shapes.setdefault(ours, shape)

    def tensors(self, keys: set[str], slices: dict | None = None):
        """(key, tensor on the device) for each of `keys`, one file open at a time; a key
        with a sharding.Slice in `slices` reads only that part of the tensor."""
        from safetensors import safe_open

        slices = slices or {}
        for path in dict.fromkeys(self.where[k][0] for k in keys):
            wanted = [k for k in keys if self.where[k][0] == path]
            if str(path).endswith(".bin"):
                for k in wanted:
                    t, part = self.pickled[self.where[k][1]], slices.get(k)
                    yield k, (t if part is None else part.take(t)).to(self.device)
                continue
            device = "cpu" if self.device.type == "cpu" else str(self.device)
            with safe_open(str(path), framework="pt", device=device) as f:
                for k in wanted:
                    name, part = self.where[k][1], slices.get(k)
                    if part is None:
                        yield k, f.get_tensor(name)
                    else:  # the rows or columns of this rank only
                        yield k, part.take(f.get_slice(name))


def nf4_keys(shapes: dict) -> set[str]:
    """The weight keys ("....weight") a checkpoint stores in bitsandbytes' NF4 format."""
    return {k[: -len(QUANT_STATE + "nf4")] for k in shapes if k.endswith(QUANT_STATE + "nf4")}


def tied_groups(model: nn.Module) -> list[list[str]]:
    """The names under which one parameter appears more than once (tied embeddings)."""
    names = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    return [group for group in names.values() if len(group) > 1]


def listed(keys) -> str:
    """The first SHOWN of keys, comma-separated, and how many more there are."""
    keys = list(keys)
    more = f" and {len(keys) - SHOWN} more" if len(keys) > SHOWN else ""
    return ", ".join(keys[:SHOWN]) + more


def check_keys(name: str, expected: dict, found: dict, nf4_weights: set[str], ignored: set[str]) -> None:
    """One ValueError naming every missing, unexpected and mis-shaped tensor."""
    state = {w + suffix for w in nf4_weights for suffix in STATE_SUFFIXES if w + suffix in found}
    missing = sorted(expected.keys() - found.keys())
    unexpected = sorted(found.keys() - expected.keys() - state - ignored)
    misshaped = sorted(k for k in expected.keys() & found.keys() if k not in nf4_weights and expected[k] != found[k])
    problems = []
    for what, keys in (("missing", missing), ("unexpected", unexpected)):
        if keys:
            problems.append(f"{len(keys)} {what}: {listed(keys)}")
    if misshaped:
        shown = ", ".join(f"{k} {found[k]} (expected {expected[k]})" for k in misshaped[:SHOWN])
        problems.append(f"{len(misshaped)} of another shape: {shown}")
    if problems:
        raise ValueError(f"{name}: the checkpoint does not fit the model its config.json describes: "
                         + "; ".join(problems))


def load_weights(model: nn.Module, dense: nn.Module, reader: Reader, *, name: str, dtype: torch.dtype,
                 quantize: bool, fresh=(), init_std: float = 0.02, slices: dict | None = None) -> list[str]:
    """Fill `model` (built on the meta device) from the weight files of `reader`.

    dense: the same architecture without quantization, on the meta device: its state dict
    is what the checkpoint must hold. Floating tensors are cast to dtype except NF4 state;
    with quantize, the weights of `model`'s NF4Linear layers are quantized as they load.
    fresh: patterns of parameters the checkpoint may lack (a warm start's new
    cross-attention), initialized as transformers initializes them (init_std); returns
    their names. slices: a tensor-parallel rank's part of each key (sharding.shard; None:
    not read on this rank), `model` being that part and `dense` the whole model."""
    device = reader.device
    expected = {k: tuple(v.shape) for k, v in dense.state_dict().items()}
    new = sorted(k for k in expected.keys() - reader.shapes.keys() if any(re.search(p, k) for p in fresh))
    for key in new:
        expected.pop(key)
    groups = tied_groups(dense)
    # A tied parameter is read once, under the first of its names the checkpoint holds.
    skipped = {n for names in groups for n in names if n != next((m for m in names if m in reader.shapes), names[0])}
    for key in skipped:
        expected.pop(key, None)
    tied = skipped & reader.shapes.keys()
    nf4_weights = nf4_keys(reader.shapes)
    check_keys(name, expected, reader.shapes, nf4_weights, ignored=tied)
    to_quantize = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, NF4Linear)} - nf4_weights
    nf4_state = {w + suffix for w in nf4_weights for suffix in STATE_SUFFIXES}  # kept in float32
    # One layer at a time: what load_state_dict's hooks build (Gemma's gate and up stacked)
    # is a transient copy of one layer, never of the model.
    layers = {}
    not_here = {k for k, part in (slices or {}).items() if part is None}
    for key in reader.shapes.keys() - tied - not_here:
        match = LAYER.match(key)
        layers.setdefault(match.group(0) if match else "", set()).add(key)
    for keys in layers.values():
        state = {}
        for key, t in reader.tensors(keys, slices):
            if t.is_floating_point() and key not in nf4_state:
                t = t.to(dtype)
            if quantize and key in to_quantize:
                state.update(weight_state_dict(nf4.quantize(t), key))
            else:
                state[key] = t
        unexpected = model.load_state_dict(state, strict=False, assign=True).unexpected_keys
        if unexpected:
            raise ValueError(f"{name}: the model has no place for {unexpected[:SHOWN]}")
    for names in groups:  # assign=True gave each loaded name its own parameter: tie them again
        loaded = next(model.get_parameter(n) for n in names if n not in skipped)
        for other in names:
            module, _, leaf = other.rpartition(".")
            setattr(model.get_submodule(module), leaf, loaded)
    for module in model.modules():
        if hasattr(module, "reset_buffers"):
            module.reset_buffers(device, dtype)
    for key in new:
        if key not in not_here:
            _initialize(model, key, device, dtype, init_std)
    left = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if left:
        raise ValueError(f"{name}: nothing in the checkpoint filled {listed(left)}")
    return new


def _initialize(model: nn.Module, key: str, device, dtype, std: float) -> None:
    """A parameter the checkpoint lacks, as transformers' _init_weights makes it: biases
    zero, norm weights one, other weights normal(0, std)."""
    module_name, _, leaf = key.rpartition(".")
    module = model.get_submodule(module_name)
    value = torch.empty(getattr(module, leaf).shape, device=device, dtype=dtype)
    if leaf == "bias":
        value.zero_()
    elif isinstance(module, nn.LayerNorm):
        value.fill_(1.0)
    else:
        value.normal_(0.0, std)
    setattr(module, leaf, nn.Parameter(value))
