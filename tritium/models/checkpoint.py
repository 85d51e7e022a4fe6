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
    """Shapes and tensors of a set of weight files, by key."""

    def __init__(self, paths: list, device: torch.device):
        self.device, self.where, self.shapes, self.pickled = device, {}, {}, {}
        from safetensors import safe_open

        for path in paths:
            if str(path).endswith(".bin"):
                tensors = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
                self.pickled.update(tensors)
                for key, t in tensors.items():
                    self.where[key], self.shapes[key] = path, tuple(t.shape)
                continue
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    self.where[key], self.shapes[key] = path, tuple(f.get_slice(key).get_shape())

    def tensors(self, keys: set[str]):
        """(key, tensor on the device) for each of `keys`, one file open at a time."""
        from safetensors import safe_open

        for path in dict.fromkeys(self.where[k] for k in keys):
            wanted = [k for k in keys if self.where[k] == path]
            if str(path).endswith(".bin"):
                yield from ((k, self.pickled[k].to(self.device)) for k in wanted)
                continue
            device = "cpu" if self.device.type == "cpu" else str(self.device)
            with safe_open(str(path), framework="pt", device=device) as f:
                yield from ((k, f.get_tensor(k)) for k in wanted)


def nf4_keys(shapes: dict) -> set[str]:
    """The weight keys ("....weight") a checkpoint stores in bitsandbytes' NF4 format."""
    return {k[: -len(QUANT_STATE + "nf4")] for k in shapes if k.endswith(QUANT_STATE + "nf4")}


def check_keys(name: str, expected: dict, found: dict, nf4_weights: set[str], ignored: set[str]) -> None:
    """One ValueError naming every missing, unexpected and mis-shaped tensor."""
    state = {w + suffix for w in nf4_weights for suffix in STATE_SUFFIXES if w + suffix in found}
    missing = sorted(expected.keys() - found.keys())
    unexpected = sorted(found.keys() - expected.keys() - state - ignored)
    misshaped = sorted(k for k in expected.keys() & found.keys() if k not in nf4_weights and expected[k] != found[k])
    problems = []
    for what, keys in (("missing", missing), ("unexpected", unexpected)):
        if keys:
            more = f" and {len(keys) - SHOWN} more" if len(keys) > SHOWN else ""
            problems.append(f"{len(keys)} {what}: {', '.join(keys[:SHOWN])}{more}")
    if misshaped:
        shown = ", ".join(f"{k} {found[k]} (expected {expected[k]})" for k in misshaped[:SHOWN])
        problems.append(f"{len(misshaped)} of another shape: {shown}")
    if problems:
        raise ValueError(f"{name}: the checkpoint does not fit the model its config.json describes: "
                         + "; ".join(problems))


def load_weights(model: nn.Module, dense: nn.Module, paths: list, *, name: str, dtype: torch.dtype,
                 device: torch.device, quantize: bool) -> None:
    """Fill `model` (built on the meta device) from the weight files `paths`.

    dense: the same architecture without quantization, on the meta device: its state dict
    is what the checkpoint must hold. Floating tensors are cast to dtype except NF4 state;
    with quantize, the weights of `model`'s NF4Linear layers are quantized as they load."""
    reader = Reader(paths, device)
    expected = {k: tuple(v.shape) for k, v in dense.state_dict().items()}
    tied = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
    for key in tied:
        expected.pop(key, None)
    nf4_weights = nf4_keys(reader.shapes)
    check_keys(name, expected, reader.shapes, nf4_weights, ignored=tied)
    to_quantize = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, NF4Linear)} - nf4_weights
    nf4_state = {w + suffix for w in nf4_weights for suffix in STATE_SUFFIXES}  # kept in float32
    # One layer at a time: what load_state_dict's hooks build (Gemma's gate and up stacked)
    # is a transient copy of one layer, never of the model.
    layers = {}
    for key in reader.shapes.keys() - tied:
        match = LAYER.match(key)
        layers.setdefault(match.group(0) if match else "", set()).add(key)
    for keys in layers.values():
        state = {}
        for key, t in reader.tensors(keys):
            if t.is_floating_point() and key not in nf4_state:
                t = t.to(dtype)
            if quantize and key in to_quantize:
                state.update(weight_state_dict(nf4.quantize(t), key))
            else:
                state[key] = t
        unexpected = model.load_state_dict(state, strict=False, assign=True).unexpected_keys
        if unexpected:
            raise ValueError(f"{name}: the model has no place for {unexpected[:SHOWN]}")
    if model.config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    for module in model.modules():
        if hasattr(module, "reset_buffers"):
            module.reset_buffers(device, dtype)
    left = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if left:
        raise ValueError(f"{name}: nothing in the checkpoint filled {', '.join(left[:SHOWN])}")
