"""The generate loop of the compact models: batched left-padded prompts, a static cache,
the prefill computing only the last position's logits, then one token per step (greedy or
sampled as transformers samples), each row stopping at any of its eos ids. On a GPU the
decode step is captured once in a CUDA graph and replayed."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch


@dataclass
class Sampling:
    """transformers' sampling: temperature, then top-k, then top-p (nucleus, at least one
    token kept), then a draw from the softmax; greedy takes the argmax."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    generator: torch.Generator | None = None

    def __post_init__(self):
        if not (isinstance(self.temperature, (int, float)) and self.temperature > 0):
            raise ValueError(f"temperature: expected a number > 0, got {self.temperature!r}")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 1):
            raise ValueError(f"top_k: expected None or an int >= 1, got {self.top_k!r}")
        if self.top_p is not None and not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p: expected None or a number in (0, 1], got {self.top_p!r}")

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """logits: (batch, vocab) float32 -> next tokens (batch,) int64."""
        if not self.do_sample:
            return logits.argmax(-1)
        scores = logits / self.temperature if self.temperature != 1.0 else logits
        if self.top_k is not None and self.top_k < scores.shape[-1]:
            kth = torch.topk(scores, self.top_k).values[..., -1:]
            scores = scores.masked_fill(scores < kth, -float("inf"))
        if self.top_p is not None and self.top_p < 1.0:
            ordered, order = scores.sort(-1)  # ascending, as transformers' TopPLogitsWarper
            tail = ordered.softmax(-1).cumsum(-1) <= 1 - self.top_p
            tail[..., -1] = False
            scores = scores.masked_fill(tail.scatter(-1, order, tail), -float("inf"))
        return torch.multinomial(scores.softmax(-1), 1, generator=self.generator).squeeze(1)


@dataclass
class GenerateOutput:
    """sequences: (batch, prompt + new) int64; logits: one (batch, vocab) float32 tensor per
    new token, the scores it was chosen from (transformers' output_logits)."""

    sequences: torch.Tensor
    logits: list[torch.Tensor] = field(default_factory=list)


def check_prompt(model, input_ids, attention_mask, max_new_tokens) -> torch.Tensor:
    """The prompt's mask (ones when none is given), after checking shapes and lengths."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.is_floating_point():
        raise ValueError(f"input_ids: expected an int tensor (batch, seqlen), got "
                         f"{getattr(input_ids, 'shape', type(input_ids).__name__)}")
    if input_ids.shape[1] == 0:
        raise ValueError("input_ids: the prompt is empty; give at least one token (e.g. bos)")
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens: expected an int >= 0, got {max_new_tokens!r}")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    elif not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask: expected the shape of input_ids {tuple(input_ids.shape)}, got "
                         f"{getattr(attention_mask, 'shape', type(attention_mask).__name__)}")
    total, limit = input_ids.shape[1] + max_new_tokens, model.config.max_position_embeddings
    if total > limit:
        raise ValueError(f"the prompt ({input_ids.shape[1]} tokens) plus max_new_tokens ({max_new_tokens}) is {total} "
                         f"positions, more than the model's max_position_embeddings ({limit})")
    return attention_mask.to(input_ids.device)


@torch.no_grad()
def generate(model, input_ids: torch.Tensor, max_new_tokens: int, *, attention_mask: torch.Tensor | None = None,
             do_sample: bool = False, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             eos_token_id: int | list[int] | None = None, pad_token_id: int | None = None,
             generator: torch.Generator | None = None, cuda_graph: bool | None = None, streamer=None,
             return_logits: bool = False):
    """Continue each prompt by up to max_new_tokens tokens.

    input_ids: (batch, seqlen) int, left-padded when the prompts differ in length, with
    attention_mask (batch, seqlen) 1 = token, 0 = padding. eos_token_id: an id or a list
    (default: the checkpoint's); a row stops at its first eos and is padded after it with
    pad_token_id (default: the checkpoint's, else its first eos), and generation ends when
    every row has stopped. do_sample/temperature/top_k/top_p/generator: see `Sampling`.
    cuda_graph: capture the decode step in a CUDA graph (default: on a CUDA device with
    the tritium backend). streamer: called with each step's new tokens (batch,).

    Returns (batch, seqlen + new) int64, the prompt first, as transformers' generate does;
    with return_logits a GenerateOutput that also holds each step's logits.
    """
    sampling = Sampling(do_sample, temperature, top_k, top_p, generator)
    mask = check_prompt(model, input_ids, attention_mask, max_new_tokens)
    eos = torch.tensor(_ids(eos_token_id, model.config.eos_token_ids), dtype=torch.long, device=input_ids.device)
    pad = pad_token_id if pad_token_id is not None else model.config.pad_token_id
    pad = pad if pad is not None else (int(eos[0]) if eos.numel() else 0)
    batch, prompt = input_ids.shape
    if max_new_tokens == 0:
        sequences = input_ids.long()
        return GenerateOutput(sequences) if return_logits else sequences

    sequences = torch.full((batch, prompt + max_new_tokens), pad, dtype=torch.long, device=input_ids.device)
    sequences[:, :prompt] = input_ids
    cache, scores = model.new_cache(batch, prompt + max_new_tokens), []
    positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)  # transformers' positions for left padding
    logits = model(input_ids, mask, position_ids=positions, cache=cache, logits_to_keep=1).logits[:, -1].float()
    step = _decode_step(model, cache, batch, cuda_graph)
    position = positions[:, -1:]
    unfinished = torch.ones(batch, dtype=torch.bool, device=input_ids.device)
    for i in range(max_new_tokens):
        scores.append(logits)
        token = sampling(logits).where(unfinished, pad)
        sequences[:, prompt + i] = token
        if streamer is not None:
            streamer(token)
        if eos.numel():
            unfinished &= ~torch.isin(token, eos)
        if i == max_new_tokens - 1 or (eos.numel() and not bool(unfinished.any())):
            break
        position = position + 1
        logits = step(token[:, None], position).float()
    sequences = sequences[:, : prompt + i + 1]
    return GenerateOutput(sequences, scores) if return_logits else sequences


def _ids(value, default: list[int]) -> list[int]:
    if value is None:
        return list(default)
    return [value] if isinstance(value, int) else list(value)


def _decode_step(model, cache, batch: int, cuda_graph: bool | None):
    """step(tokens (batch, 1), positions (batch, 1)) -> the next logits (batch, vocab)."""
    def eager(tokens, positions):
        return model(tokens, position_ids=positions, cache=cache, logits_to_keep=1).logits[:, -1]

    use_graph = cuda_graph if cuda_graph is not None else (
        model.device.type == "cuda" and model.attn_implementation == "tritium")
    if not use_graph:
        return eager
    if model.device.type != "cuda" or model.attn_implementation != "tritium":
        raise ValueError("cuda_graph=True: the decode step is captured on a CUDA device with "
                         "attn_implementation='tritium' only")
    return CapturedStep(model, cache, batch, eager)


class CapturedStep:
    """The decode step recorded once in a CUDA graph and replayed for every token: its
    inputs are copied into static tensors, the cache's lengths are a tensor the graph
    reads (advanced outside it), and every launch keeps its address and shape.

    The first call runs two eager steps on a side stream (compiling and looking up every
    kernel config; nothing is tuned inside a capture) and then captures; if capture fails
    the step stays eager, with one warning."""

    def __init__(self, model, cache, batch: int, eager):
        self.model, self.cache, self.eager = model, cache, eager
        self.graph, self.failed = None, False
        self.tokens = torch.zeros(batch, 1, dtype=torch.long, device=model.device)
        self.positions = torch.zeros(batch, 1, dtype=torch.long, device=model.device)

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        if self.graph is None and not self.failed:
            self._capture(tokens, positions)
        if self.graph is None:
            return self.eager(tokens, positions)
        self.tokens.copy_(tokens)
        self.positions.copy_(positions)
        self.graph.replay()
        self.cache.advance(1)
        return self.logits.clone()  # the next replay overwrites the static output

    def _run(self) -> torch.Tensor:
        return self.model(self.tokens, position_ids=self.positions, cache=self.cache, logits_to_keep=1).logits[:, -1]

    def _capture(self, tokens: torch.Tensor, positions: torch.Tensor) -> None:
        cache, length = self.cache, self.cache.length
        self.tokens.copy_(tokens)
        self.positions.copy_(positions)
        cache.graph_lengths = True
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):  # these write cache row `length`, which the real step rewrites
                    self._run()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self.logits = self._run()
            self.graph = graph
        except Exception as error:  # noqa: BLE001 - any capture failure leaves the step eager
            self.failed = True
            warnings.warn(f"tritium: the decode step could not be captured in a CUDA graph ({error}); it runs eagerly",
                          stacklevel=3)
        finally:
            cache.graph_lengths = False
            cache.lengths.fill_(length)
