"""MLP modules on tritium's kernels that keep transformers' parameter names, so the
checkpoints of the five families load unchanged.

- `Linear`: nn.Linear with the activation fused into the GEMM. BART, MVP and
  BigBird-Pegasus layers hold `fc1` (with the activation) and `fc2` themselves;
  BertGeneration holds `intermediate.dense` (with the activation) and `output.dense`
  (followed by dropout and LayerNorm(h + residual)). A layer that uses `Linear` for
  these keeps their names exactly.
- `FeedForward`: fc2(dropout(act(fc1(x)))), BART's feed-forward as one module.
- `GatedMLP`: down_proj(act(gate(x)) * up(x)) with GLM-4's `gate_up_proj` / `down_proj`;
  Gemma 2's `gate_proj` / `up_proj` / `down_proj` checkpoints load into it too.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tritium.kernels.activations import check_activation
from tritium.kernels.mlp import gated_mlp, linear

# transformers' activation names (config.hidden_act, hidden_activation,
# activation_function) -> tritium's; the ones missing here have no kernel.
HF_ACTIVATIONS = {
    "gelu": "gelu", "gelu_python": "gelu",
    "gelu_new": "gelu_tanh", "gelu_fast": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_python_tanh": "gelu_tanh",
    "relu": "relu", "silu": "silu", "swish": "silu",
}


def activation_from_hf(name: str) -> str:
    """tritium's name for a transformers activation: "gelu_new" -> "gelu_tanh", ..."""
    if name not in HF_ACTIVATIONS:
        raise ValueError(f"activation: transformers' {name!r} has no tritium kernel; supported: {sorted(HF_ACTIVATIONS)}")
    return HF_ACTIVATIONS[name]


class Linear(nn.Linear):
    """nn.Linear computing act(x W^T + b) in one GEMM; same parameters and state dict.

    activation: None, "gelu", "gelu_tanh", "relu" or "silu" (tritium's names; see
    `activation_from_hf`).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, activation: str | None = None,
                 device=None, dtype=None):
        check_activation(activation)
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias, self.activation)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, activation={self.activation}"


class FeedForward(nn.Module):
    """fc2(dropout(act(fc1(x)))): the feed-forward of BART, MVP and BigBird-Pegasus layers
    (parameters fc1.weight, fc1.bias, fc2.weight, fc2.bias), the activation fused into
    fc1. activation_dropout applies in training only, after the activation, as BART does.
    x: (..., hidden_size) -> (..., hidden_size)."""

    def __init__(self, hidden_size: int, intermediate_size: int, activation: str = "gelu", *, bias: bool = True,
                 activation_dropout: float = 0.0, device=None, dtype=None):
        super().__init__()
        self.fc1 = Linear(hidden_size, intermediate_size, bias, activation, device=device, dtype=dtype)
        self.fc2 = Linear(intermediate_size, hidden_size, bias, device=device, dtype=dtype)
        self.activation_dropout = activation_dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        if self.training and self.activation_dropout > 0:
            h = F.dropout(h, self.activation_dropout, training=True)
        return self.fc2(h)


class GatedMLP(nn.Module):
    """down_proj(act(x W_gate^T) * (x W_up^T)): SwiGLU (GLM-4, "silu") or GeGLU (Gemma 2,
    "gelu_tanh"), the gate and up projections in one kernel. x: (..., hidden_size).

    Parameters are GLM-4's: gate_up_proj.weight (2 * intermediate_size, hidden_size), the
    gate rows first, and down_proj.weight (hidden_size, intermediate_size). Gemma 2's
    checkpoints hold gate_proj.weight and up_proj.weight apart: a load_state_dict
    pre-hook stacks them, so either layout loads. separate_gate_up=True makes
    state_dict() split them back (copies, so safetensors can save them), so what is saved
    is what transformers' Gemma2MLP loads.
    """

    def __init__(self, hidden_size: int, intermediate_size: int, activation: str = "silu", *,
                 separate_gate_up: bool = False, device=None, dtype=None):
        super().__init__()
        check_activation(activation, allow_none=False)
        self.gate_up_proj = nn.Linear(hidden_size, 2 * intermediate_size, bias=False, device=device, dtype=dtype)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False, device=device, dtype=dtype)
        self.activation = activation
        self.register_load_state_dict_pre_hook(_stack_gate_up)
        if separate_gate_up:
            self.register_state_dict_post_hook(_split_gate_up)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gated_mlp(x, self.gate_up_proj.weight, self.down_proj.weight, self.activation)

    def extra_repr(self) -> str:
        return f"activation={self.activation}"


def _stack_gate_up(module, state_dict, prefix, *_) -> None:
    """Gemma 2 layout -> GLM-4 layout: gate_proj and up_proj become gate_up_proj, gate first.
    With only one of the two present nothing changes, and a strict load names both."""
    gate, up = f"{prefix}gate_proj.weight", f"{prefix}up_proj.weight"
    if gate in state_dict and up in state_dict:
        state_dict[f"{prefix}gate_up_proj.weight"] = torch.cat((state_dict.pop(gate), state_dict.pop(up)))


def _split_gate_up(module, state_dict, prefix, _local_metadata) -> None:
    gate, up = state_dict.pop(f"{prefix}gate_up_proj.weight").chunk(2)
    state_dict[f"{prefix}gate_proj.weight"] = gate.clone()
    state_dict[f"{prefix}up_proj.weight"] = up.clone()
