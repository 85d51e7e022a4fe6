"""The generate loop of the compact models: batched left-padded prompts, a static cache,
the prefill computing only the last position's logits, then one token per step (greedy or
sampled as transformers samples), each row stopping at any of its eos ids. On a GPU the
decode step is captured once in a CUDA graph and replayed."""

from __future__ import annotations

import warnings
from collections.abc import Callable
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
class Rules:
    """transformers' logits processors that change which tokens may come next, in its
    order: no_repeat_ngram_size (no n-gram twice in a sequence), forced_bos_token_id (the
    first new token after a one-token prefix), forced_eos_token_id (the last token before
    max_length). max_length: prefix + max_new_tokens."""

    max_length: int
    no_repeat_ngram_size: int = 0
    forced_bos_token_id: int | None = None
    forced_eos_token_id: list[int] = field(default_factory=list)

    def apply(self, length: int) -> bool:
        """Whether any rule can change the scores of the token after `length` tokens."""
        return (bool(self.no_repeat_ngram_size) and length >= self.no_repeat_ngram_size) or (
            self.forced_bos_token_id is not None and length == 1) or (
            bool(self.forced_eos_token_id) and length == self.max_length - 1)

    def __call__(self, sequences: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """sequences: (rows, cur_len) so far; scores: (rows, vocab), changed in place."""
        length, n = sequences.shape[1], self.no_repeat_ngram_size
        if n and length >= n:  # no n-gram is complete before n tokens
            windows = sequences.unfold(1, n, 1)  # (rows, length - n + 1, n): every n-gram so far
            seen = (windows[:, :, :-1] == sequences[:, length - n + 1:][:, None, :]).all(-1)
            # Summed, not scattered: a token may end several n-grams, seen or not.
            banned = torch.zeros_like(scores, dtype=torch.long).scatter_add_(1, windows[:, :, -1], seen.long())
            scores.masked_fill_(banned > 0, -float("inf"))
        if self.forced_bos_token_id is not None and length == 1:
            _force(scores, [self.forced_bos_token_id])
        if self.forced_eos_token_id and length == self.max_length - 1:
            _force(scores, self.forced_eos_token_id)
        return scores


def _force(scores: torch.Tensor, tokens: list[int]) -> None:
    scores.fill_(-float("inf"))
    scores[:, tokens] = 0.0


@dataclass
class Session:
    """A generation in progress, as a model starts it (`model.start_generation`):

    prefix: (rows, n) the tokens every output starts with (a decoder's prompt; an
        encoder-decoder's decoder start token), rows = batch x beams;
    logits: (rows, vocab) the scores of the first new token;
    step(tokens (rows,)) -> the next logits, the tokens appended to every row;
    reorder(index (rows,)): row i continues from row index[i]'s state (beam search)."""

    prefix: torch.Tensor
    logits: torch.Tensor
    step: Callable[[torch.Tensor], torch.Tensor]
    reorder: Callable[[torch.Tensor], None]


@dataclass
class GenerateOutput:
    """sequences: (batch, prefix + new) int64; logits: one (rows, vocab) float32 tensor per
    step, the raw scores of that step (transformers' output_logits; with beams, rows =
    batch x beams in the order the beams ran)."""

    sequences: torch.Tensor
    logits: list[torch.Tensor] = field(default_factory=list)


def check_prompt(input_ids, attention_mask, max_new_tokens) -> torch.Tensor:
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
    return attention_mask.to(input_ids.device)


def check_length(name: str, needed: int, limit: int) -> None:
    if needed > limit:
        raise ValueError(f"{name} needs {needed} positions, more than the model's max_position_embeddings ({limit})")


def expand(t: torch.Tensor, beams: int) -> torch.Tensor:
    """Each row repeated `beams` times in place (rows b*beams .. b*beams + beams - 1)."""
    return t.repeat_interleave(beams, dim=0) if beams > 1 else t


@torch.no_grad()
def generate(model, input_ids: torch.Tensor, max_new_tokens: int, *, attention_mask: torch.Tensor | None = None,
             do_sample: bool = False, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             num_beams: int = 1, length_penalty: float = 1.0, early_stopping: bool | str = False,
             no_repeat_ngram_size: int = 0, eos_token_id: int | list[int] | None = None,
             pad_token_id: int | None = None, generator: torch.Generator | None = None,
             cuda_graph: bool | None = None, streamer=None, return_logits: bool = False):
    """Continue each input by up to max_new_tokens tokens, as transformers' generate does.

    input_ids: (batch, seqlen) int with attention_mask (batch, seqlen) 1 = token, 0 =
    padding: a decoder's prompts, left-padded; an encoder-decoder's source, padded either
    side. eos_token_id: an id or a list (default: the checkpoint's); a row stops at its
    first eos and is padded after it with pad_token_id (default: the checkpoint's, else
    its first eos); generation ends when every row has stopped.
    do_sample/temperature/top_k/top_p/generator: see `Sampling` (top_k None: no top-k,
    where transformers' default is 50). num_beams > 1: beam search (up to 8 beams) with
    length_penalty and early_stopping (False, True or "never") as transformers scores it.
    no_repeat_ngram_size, and the checkpoint's forced_bos/eos_token_id: see `Rules`.
    cuda_graph: capture the decode step in a CUDA graph (default: on a CUDA device with
    the tritium backend). streamer: called with each step's new tokens (batch,), greedy or
    sampled only.

    Returns (batch, prefix + new) int64, the prefix first (a decoder's prompt, an
    encoder-decoder's decoder start token); with return_logits a GenerateOutput that also
    holds each step's logits.
    """
    sampling = Sampling(do_sample, temperature, top_k, top_p, generator)
    mask = check_prompt(input_ids, attention_mask, max_new_tokens)
    if not isinstance(num_beams, int) or not 1 <= num_beams <= 8:
        raise ValueError(f"num_beams: expected an int in [1, 8], got {num_beams!r}")
    if num_beams > 1 and (do_sample or streamer is not None):
        raise ValueError("num_beams > 1: beam search is deterministic and returns whole beams at the end; "
                         "do_sample and streamer are for num_beams=1")
    if early_stopping not in (False, True, "never"):
        raise ValueError(f"early_stopping: expected False, True or 'never', got {early_stopping!r}")
    if not isinstance(no_repeat_ngram_size, int) or no_repeat_ngram_size < 0:
        raise ValueError(f"no_repeat_ngram_size: expected an int >= 0, got {no_repeat_ngram_size!r}")
    config = model.config
    eos = _ids(eos_token_id, config.eos_token_ids)
    pad = pad_token_id if pad_token_id is not None else config.pad_token_id
    pad = pad if pad is not None else (eos[0] if eos else 0)
    session = model.start_generation(input_ids, mask, beams=num_beams, max_new_tokens=max_new_tokens,
                                     cuda_graph=cuda_graph)
    rules = Rules(session.prefix.shape[1] + max_new_tokens, no_repeat_ngram_size,
                  getattr(config, "forced_bos_token_id", None), _ids(getattr(config, "forced_eos_token_id", None), []))
    eos = torch.tensor(eos, dtype=torch.long, device=input_ids.device)
    if num_beams > 1:
        sequences, scores = _beam_search(session, rules, eos, pad, num_beams, max_new_tokens, length_penalty,
                                         early_stopping)
    else:
        sequences, scores = _one_path(session, rules, sampling, eos, pad, max_new_tokens, streamer)
    return GenerateOutput(sequences, scores) if return_logits else sequences


def _one_path(session: Session, rules: Rules, sampling: Sampling, eos, pad: int, max_new_tokens: int, streamer):
    """Greedy or sampled: one sequence per row."""
    rows, prefix = session.prefix.shape
    sequences = torch.full((rows, prefix + max_new_tokens), pad, dtype=torch.long, device=session.prefix.device)
    sequences[:, :prefix] = session.prefix
    if max_new_tokens == 0:
        return sequences, []
    logits, scores = session.logits.float(), []
    unfinished = torch.ones(rows, dtype=torch.bool, device=sequences.device)
    for i in range(max_new_tokens):
        scores.append(logits)
        if rules.apply(prefix + i):  # on a copy: the raw logits are what return_logits gives back
            logits = rules(sequences[:, : prefix + i], logits.clone())
        token = sampling(logits).where(unfinished, pad)
        sequences[:, prefix + i] = token
        if streamer is not None:
            streamer(token)
        if eos.numel():
            unfinished &= ~torch.isin(token, eos)
        if i == max_new_tokens - 1 or (eos.numel() and not bool(unfinished.any())):
            break
        logits = session.step(token).float()
    return sequences[:, : prefix + i + 1], scores


def _beam_search(session: Session, rules: Rules, eos, pad: int, beams: int, max_new_tokens: int,
                 length_penalty: float, early_stopping) -> tuple[torch.Tensor, list]:
    """transformers' beam search: each step keeps the best 2 x beams (more with several
    eos ids) continuations of all beams by summed log-probability; those ending in eos or
    at max_length join the finished beams (scored sum / generated length ** length_penalty)
    when among the best `beams`; the rest continue. It stops when no running beam can beat
    the worst finished one (early_stopping False: judged at the current length; "never":
    at max_length when length_penalty > 0), when every beam is finished (True), or at
    max_length. Returns the best finished beam of each input."""
    rows, prefix = session.prefix.shape
    batch, device = rows // beams, session.prefix.device
    max_length = prefix + max_new_tokens
    keep = max(2, 1 + eos.numel()) * beams
    is_top = torch.arange(keep, device=device) < beams
    # Where a finished sequence ends: transformers fills with pad, or eos when pad is 0.
    fill = pad if pad else (int(eos[0]) if eos.numel() else -1)
    running = torch.full((batch, beams, max_length), fill, dtype=torch.long, device=device)
    running[:, :, :prefix] = session.prefix.view(batch, beams, prefix)
    running_scores = torch.zeros(batch, beams, device=device)
    running_scores[:, 1:] = -1e9  # the beams start equal: only the first may expand
    finished, finished_scores = running.clone(), torch.full((batch, beams), -1e9, device=device)
    finished_lengths = torch.zeros(batch, beams, dtype=torch.long, device=device)
    is_finished = torch.zeros(batch, beams, dtype=torch.bool, device=device)
    improvable = torch.ones(batch, 1, dtype=torch.bool, device=device)
    logits, scores, length = session.logits.float(), [], prefix
    while True:
        scores.append(logits)
        log_probs = rules(running.view(rows, -1)[:, :length], logits.log_softmax(-1))
        vocab = log_probs.shape[-1]
        total = (log_probs.view(batch, beams, vocab) + running_scores[..., None]).view(batch, -1)
        cand_scores, cand = total.topk(keep)
        source, token = cand // vocab, cand % vocab
        cand_seqs = running.gather(1, source[..., None].expand(-1, -1, max_length)).clone()
        cand_seqs[:, :, length] = token
        ends = torch.isin(token, eos) | (length + 1 >= max_length)
        # The best `beams` continuations that did not end run on.
        live = cand_scores + ends.float() * -1.0e9
        chosen = live.topk(beams).indices
        running, running_scores = cand_seqs.gather(1, chosen[..., None].expand(-1, -1, max_length)), live.gather(1, chosen)
        parents = source.gather(1, chosen)
        # The best `beams` that ended join the finished ones, if they beat them.
        done_now = ends & is_top
        penalised = cand_scores / (length + 1 - prefix) ** length_penalty
        # Three separate additions, as transformers makes them: in float32 a score near
        # -1e9 loses its digits, and ties must break as they break there.
        penalised += (is_finished.all(-1, keepdim=True) & (early_stopping is True)).float() * -1.0e9
        penalised += (~improvable).float() * -1.0e9
        penalised += (~done_now).float() * -1.0e9
        merged_scores = torch.cat([finished_scores, penalised], 1)
        best = merged_scores.topk(beams).indices
        finished = torch.cat([finished, cand_seqs], 1).gather(1, best[..., None].expand(-1, -1, max_length))
        finished_scores = merged_scores.gather(1, best)
        new_lengths = torch.full_like(done_now, length + 1 - prefix, dtype=torch.long)
        finished_lengths = torch.cat([finished_lengths, new_lengths], 1).gather(1, best)
        is_finished = torch.cat([is_finished, done_now], 1).gather(1, best)
        length += 1
        improvable = improvable & _can_improve(running_scores, finished_scores, is_finished, length, prefix,
                                               max_length, early_stopping, length_penalty)
        session.reorder((parents + torch.arange(batch, device=device)[:, None] * beams).view(-1))
        if not (bool(improvable.any()) and not (bool(is_finished.all()) and early_stopping is True)
                and not bool(ends.all())):
            break
        logits = session.step(running[:, :, length - 1].reshape(-1)).float()
    generated = int(finished_lengths[:, 0].max())
    return finished[:, 0, : prefix + generated], scores


def _can_improve(running_scores, finished_scores, is_finished, length, prefix, max_length, early_stopping,
                 length_penalty):
    """Whether the best running beam could still beat the worst finished one (per input)."""
    if early_stopping == "never" and length_penalty > 0.0:
        best_length = max_length - prefix
    else:
        best_length = length - prefix
    best_running = running_scores[:, :1] / best_length**length_penalty
    worst = torch.where(is_finished, finished_scores.min(1, keepdim=True).values, -1.0e9)
    return (best_running > worst).any(-1, keepdim=True)


def _ids(value, default: list[int]) -> list[int]:
    if value is None:
        return list(default)
    return [value] if isinstance(value, int) else list(value)


def decode_step(model, cache, rows: int, cuda_graph: bool | None, run):
    """The decode step to call: run(tokens (rows, 1), positions (rows, 1)) -> logits (rows,
    vocab), eager or captured in a CUDA graph (default: on CUDA with the tritium backend)."""
    use_graph = cuda_graph if cuda_graph is not None else (
        model.device.type == "cuda" and model.attn_implementation == "tritium")
    if not use_graph:
        return run
    if model.device.type != "cuda" or model.attn_implementation != "tritium":
        raise ValueError("cuda_graph=True: the decode step is captured on a CUDA device with "
                         "attn_implementation='tritium' only")
    return CapturedStep(run, cache, rows, model.device)


class CapturedStep:
    """The decode step run(tokens, positions) recorded once in a CUDA graph and replayed for
    every token: its inputs are copied into static tensors, the cache's lengths are a
    tensor the graph reads (advanced outside it), and every launch keeps its address and
    shape.

    The first call runs two eager steps on a side stream (compiling and looking up every
    kernel config; nothing is tuned inside a capture) and then captures; if capture fails
    the step stays eager, with one warning."""

    def __init__(self, run, cache, rows: int, device):
        self.run, self.cache = run, cache
        self.graph, self.failed = None, False
        self.tokens = torch.zeros(rows, 1, dtype=torch.long, device=device)
        self.positions = torch.zeros(rows, 1, dtype=torch.long, device=device)

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        if self.graph is None and not self.failed:
            self._capture(tokens, positions)
        if self.graph is None:
            return self.run(tokens, positions)
        self.tokens.copy_(tokens)
        self.positions.copy_(positions)
        self.graph.replay()
        self.cache.advance(1)
        return self.logits.clone()  # the next replay overwrites the static output

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
                    self.run(self.tokens, self.positions)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self.logits = self.run(self.tokens, self.positions)
            self.graph = graph
        except Exception as error:  # noqa: BLE001 - any capture failure leaves the step eager
            self.failed = True
            warnings.warn(f"tritium: the decode step could not be captured in a CUDA graph ({error}); it runs eagerly",
                          stacklevel=3)
        finally:
            cache.graph_lengths = False
            cache.lengths.fill_(length)
