"""Speculative decoding: a cheap guess of the next k tokens, checked by the real model in one pass.

Decoding one token costs one forward pass of the target model, and on a small batch that pass is
dominated by reading the weights, not by the arithmetic: scoring k + 1 positions costs little more
than scoring one. Leviathan, Kalman and Matias, "Fast Inference from Transformers via Speculative
Decoding" (2023), and Chen et al. (2023) exploit this. A *draft* proposes k tokens; the target
scores all of them at once; draft token x at position i, proposed with probability q(x), is kept
with probability min(1, p(x) / q(x)) where p is the target's distribution there. At the first
rejection the target's token is drawn from the residual max(0, p - q), renormalised, and the round
ends; if all k are kept, the target's distribution after them gives one more token for free.
This rule makes every emitted token distributed exactly as the target alone would sample it; with
greedy decoding it reduces to "keep the draft while it equals the target's argmax", so the output
is the target's, token for token.

Three drafts, one verifier:
- `ModelDrafter`: a smaller family member samples the k tokens (its distribution q is known).
- `PredictionDrafter`: the API's predicted outputs: the caller's expected text is the draft (an
  editor sends the file it expects back with small changes). A fixed guess is a draft whose q is a
  point mass, so x is kept with probability p(x).
- `PromptLookupDrafter`: prompt-lookup decoding (Saxena, 2023): find the latest earlier occurrence of
  the sequence's last n tokens and propose what followed it there.

With acceptance rate alpha (the chance a draft token is kept), k drafts per round and cost ratio
c (a draft step over a target pass), Leviathan et al. predict `(1 - alpha ** (k + 1)) / (1 - alpha)`
tokens per target pass and a speed-up of that over `k * c + 1`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

import torch
import torch.nn.functional as F

from minigpt.model import GPT
from minigpt.sampler import Decoder, SamplingParams, next_token_probabilities, sample_token


class Draft(NamedTuple):
    tokens: list[int]
    probabilities: torch.Tensor | None  # (len(tokens), vocab): the q each was drawn from; None for a fixed guess


class Drafter(Protocol):
    def propose(self, sequence: list[int], k: int, params: SamplingParams, counts: torch.Tensor,
                generator: torch.Generator | None) -> Draft: ...


class ModelDrafter:
    """Drafts by sampling a smaller model with the same sampling parameters (KV cache kept between rounds)."""

    def __init__(self, model: GPT):
        self.model = model
        self.decoder: Decoder | None = None

    def propose(self, sequence, k, params, counts, generator) -> Draft:
        if self.decoder is None:
            self.decoder = Decoder(self.model, sequence)
        self.decoder.tokens = list(sequence)  # the cache keeps whatever prefix still agrees
        tokens, rows, counts = [], [], counts.clone()
        for _ in range(k):
            q = next_token_probabilities(self.decoder.logits(tokens)[-1], params, counts)  # (vocab,)
            token = int(q.argmax()) if params.temperature == 0 else sample_token(q, generator)
            tokens.append(token), rows.append(q)
            counts[token] += 1
        return Draft(tokens, torch.stack(rows) if rows else None)


class PredictionDrafter:
    """Drafts from the caller's predicted output: the next k tokens of the prediction, re-aligned
    after a rejection by finding the output's last tokens in the prediction."""

    def __init__(self, prediction: Sequence[int], prompt_length: int, max_ngram: int = 4):
        self.prediction, self.prompt_length, self.max_ngram = list(prediction), prompt_length, max_ngram
        self.position: int | None = 0  # where in the prediction the output continues, if known

    def propose(self, sequence, k, params, counts, generator) -> Draft:
        self.position = self._align(sequence[self.prompt_length:])
        if self.position is None:
            return Draft([], None)
        return Draft(self.prediction[self.position : self.position + k], None)

    def _align(self, output: list[int]) -> int | None:
        """Where the prediction continues the output: after the output so far if it matches the
        prediction's start, else after the latest occurrence of the output's last n tokens."""
        if output == self.prediction[: len(output)]:
            return len(output)
        return _continuation(self.prediction, output, self.max_ngram)


class PromptLookupDrafter:
    """Drafts by copying what followed the latest earlier occurrence of the sequence's last n tokens."""

    def __init__(self, max_ngram: int = 3):
        self.max_ngram = max_ngram

    def propose(self, sequence, k, params, counts, generator) -> Draft:
        start = _continuation(sequence, sequence, self.max_ngram)  # an occurrence before the tail itself
        if start is None:
            return Draft([], None)
        return Draft(sequence[start : start + k], None)


def _continuation(source: list[int], recent: list[int], max_ngram: int) -> int | None:
    """The index in `source` right after the latest occurrence of `recent`'s last n tokens (largest n
    first) that ends before the end of `source`, so something follows it."""
    for n in range(min(max_ngram, len(recent)), 0, -1):
        tail = recent[-n:]
        for end in range(len(source), n - 1, -1):
            if source[end - n : end] == tail and end < len(source):
                return end
    return None


@dataclass
class Round:
    """One draft-and-verify round: what was drafted, how many were kept, and the target's own token."""

    drafted: list[int]
    accepted: int
    target_token: int  # the resampled token at the rejection, or the bonus token after k acceptances


@dataclass
class SpeculativeResult:
    tokens: list[int]
    rounds: list[Round] = field(default_factory=list)
    finish_reason: str = "length"

    @property
    def target_passes(self) -> int:
        return len(self.rounds)

    @property
    def drafted(self) -> int:
        return sum(len(r.drafted) for r in self.rounds)

    @property
    def accepted(self) -> int:
        return sum(r.accepted for r in self.rounds)

    @property
    def acceptance_rate(self) -> float:
        """Kept drafts over drafts the target judged (those after a rejection are never judged)."""
        judged = sum(min(r.accepted + 1, len(r.drafted)) for r in self.rounds)
        return self.accepted / judged if judged else 0.0

    @property
    def tokens_per_pass(self) -> float:
        return len(self.tokens) / max(self.target_passes, 1)


def expected_tokens_per_pass(alpha: float, k: int) -> float:
    """Leviathan et al.'s expected tokens per target pass: `(1 - alpha ** (k + 1)) / (1 - alpha)`."""
    return k + 1.0 if alpha >= 1 else (1 - alpha ** (k + 1)) / (1 - alpha)


def predicted_speedup(alpha: float, k: int, cost_ratio: float) -> float:
    """Leviathan et al.'s predicted wall-clock speed-up: tokens per pass over the round's cost `k * c + 1`."""
    return expected_tokens_per_pass(alpha, k) / (k * cost_ratio + 1)


def _judge(p: torch.Tensor, q: torch.Tensor | None, token: int, params: SamplingParams,
           generator: torch.Generator | None) -> int | None:
    """None if draft `token` is kept, else the target's replacement drawn from the residual.

    `p` and `q` are the target's and draft's distributions (vocab,); q None is a fixed guess (a point mass).
    """
    q = F.one_hot(torch.tensor(token), len(p)).float() if q is None else q
    if params.temperature == 0:
        target = int(p.argmax())
        return None if target == token else target
    if torch.rand((), generator=generator) < torch.clamp(p[token] / q[token], max=1.0):
        return None
    residual = (p - q).clamp(min=0)
    if residual.sum() <= 0:  # only by rounding: p and q equal where q has mass
        residual = p
    return sample_token(residual / residual.sum(), generator)


@torch.no_grad()
def speculative_generate(target: GPT, drafter: Drafter, prompt: Sequence[int], max_tokens: int, k: int = 4,
                         params: SamplingParams = SamplingParams(temperature=0.0), seed: int | None = None,
                         end_token: int | None = None) -> SpeculativeResult:
    """Up to `max_tokens` tokens from `target`, drafted `k` at a time by `drafter` and verified exactly."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k (draft tokens per round) must be an integer >= 1, got {k!r}")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise ValueError(f"max_tokens must be a positive integer, got {max_tokens!r}")
    prompt = list(prompt)
    if len(prompt) + max_tokens > target.config.context:
        raise ValueError(f"a {len(prompt)}-token prompt plus max_tokens={max_tokens} exceeds the model's context of "
                         f"{target.config.context} tokens")
    params.check_vocabulary(target.config.vocab_size)
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    decoder, result = Decoder(target, prompt), SpeculativeResult([])
    counts = torch.zeros(target.config.vocab_size)
    while len(result.tokens) < max_tokens:
        room = max_tokens - len(result.tokens) - 1  # the target adds one token of its own every round
        draft = drafter.propose(decoder.tokens, min(k, room), params, counts, generator) if room else Draft([], None)
        logits = decoder.logits(draft.tokens)  # (len(drafts) + 1, vocab): one pass scores every draft
        kept, running = [], counts.clone()
        for i, token in enumerate(draft.tokens):
            p = next_token_probabilities(logits[i], params, running)
            replacement = _judge(p, None if draft.probabilities is None else draft.probabilities[i], token, params,
                                 generator)
            if replacement is not None:
                own = replacement
                break
            kept.append(token)
            running[token] += 1
        else:
            p = next_token_probabilities(logits[len(draft.tokens)], params, running)
            own = int(p.argmax()) if params.temperature == 0 else sample_token(p, generator)
        result.rounds.append(Round(draft.tokens, len(kept), own))
        new = kept + [own]
        if end_token is not None and end_token in new:
            new = new[: new.index(end_token)]
            result.finish_reason = "stop"
        decoder.commit(new)
        result.tokens += new
        for token in new:
            counts[token] += 1
        if result.finish_reason == "stop":
            break
    return result
