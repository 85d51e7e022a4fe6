"""The static KV cache of the compact decoders: every layer's keys and values preallocated
for the whole generation, as flash_attention_with_kvcache takes them, so the decode step
has fixed shapes and addresses (what a CUDA graph needs)."""

from __future__ import annotations

import torch


class StaticCache:
    """keys[l], values[l]: (batch, max_seqlen, heads_kv, head_dim) per layer; key_padding_mask
    (batch, max_seqlen) bool, False at the pad positions of a left-padded batch.

    Every row holds the same number of positions (`length`, left padding keeps the rows
    aligned), so the next tokens go to row `length` of every sequence. `lengths` is the
    same count as an int32 (batch,) tensor, for a captured decode step whose launches
    cannot take a Python int that changes."""

    def __init__(self, num_layers: int, batch: int, max_seqlen: int, heads_kv: int, head_dim: int, *,
                 dtype: torch.dtype, device: torch.device | str | None = None):
        shape = (batch, max_seqlen, heads_kv, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.key_padding_mask = torch.ones(batch, max_seqlen, dtype=torch.bool, device=device)
        self.lengths = torch.zeros(batch, dtype=torch.int32, device=device)
        self.length = 0
        self.padded = False  # whether key_padding_mask hides any position (else the kernels skip it)
        self.graph_lengths = False  # True inside a captured step: launches read `lengths`

    @property
    def batch(self) -> int:
        return self.key_padding_mask.shape[0]

    @property
    def max_seqlen(self) -> int:
        return self.key_padding_mask.shape[1]

    @property
    def start(self) -> int | torch.Tensor:
        """Where the next tokens go: an int in eager calls, the `lengths` tensor in a
        captured step."""
        return self.lengths if self.graph_lengths else self.length

    def set_padding(self, start: int, mask: torch.Tensor) -> None:
        """Record mask (batch, n) bool, True = token, for positions start .. start + n
        (one host read, to know whether any position is padding)."""
        self.key_padding_mask[:, start:start + mask.shape[1]] = mask
        self.padded = self.padded or not bool(mask.all())

    @property
    def attend_mask(self) -> torch.Tensor | None:
        """key_padding_mask when some position is padding, else None."""
        return self.key_padding_mask if self.padded else None

    def check_room(self, new_tokens: int) -> None:
        if self.length + new_tokens > self.max_seqlen:
            raise ValueError(f"the cache holds {self.max_seqlen} positions: {self.length} are used and "
                             f"{new_tokens} more do not fit")

    def advance(self, new_tokens: int) -> None:
        """Count `new_tokens` written into every sequence."""
        self.length += new_tokens
        self.lengths.fill_(self.length)

    def reorder(self, index: torch.Tensor) -> None:
        """Row i takes row index[i]'s keys, values and mask (beam search), in place: the
        buffers keep their addresses (a captured step reads them)."""
        for t in (*self.keys, *self.values):
            t[:, : self.length] = t[:, : self.length].index_select(0, index)
        self.key_padding_mask.copy_(self.key_padding_mask.index_select(0, index))

    def memory_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)
