"""The sampler: what a caller of the GPT-4.1 mini API controls at generation time.

A model gives logits for the next token; the sampler turns them into a choice. The API's controls
are each a small function on the logits (a *logits processor*), applied in a fixed order:

    logit bias -> presence and frequency penalties -> temperature -> top-k -> top-p -> min-p

- **logit bias** adds a number in [-100, 100] to chosen token ids (-100 bans a token, +100 forces it).
- **presence and frequency penalties** (OpenAI's semantics, each in [-2, 2]): with `c[j]` the number of
  times token j was already sampled in this completion,
  `logit[j] -= c[j] * frequency_penalty + (c[j] > 0) * presence_penalty`.
- **temperature** divides the logits: below 1 sharpens, above 1 flattens; 0 means greedy (argmax).
- **top-k** keeps the k most likely tokens; **top-p** (nucleus) the smallest set whose probability
  reaches p; **min-p** the tokens at least `min_p` times as likely as the most likely one.

Where temperature sits is a choice. Hugging Face transformers divides by the temperature first and
truncates the tempered distribution; llama.cpp's default chain truncates first and applies the
temperature last. top-k does not care (dividing keeps the ranking), but top-p and min-p do: a high
temperature first flattens the distribution, so the nucleus or the min-p threshold lets in more
tokens. `SamplingParams.temperature_last` switches to llama.cpp's order.

Around the processors sits the decoding loop: seeds, `n` completions, `max_tokens`, stop sequences
matched on the decoded text (even when one spans several tokens, and never returned), per-token
logprobs, a finish reason, streaming that never splits a UTF-8 character, and beam search as the
deterministic alternative. Decoding runs on the KV cache, except where the cache would be wrong:
dynamic NTK rotates every position by a base that grows with the length, so past the model's
original context the decoder recomputes the whole sequence at each step rather than reuse stale keys.
"""

from __future__ import annotations

import codecs
import math
import numbers
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F

from minigpt.model import GPT
from minigpt.positions import cached_keys_stay_exact
from minigpt.tokenizer import Tokenizer

END_OF_TEXT = "<|endoftext|>"
MAX_STOP_SEQUENCES = 4  # the API accepts up to four
MAX_TOP_LOGPROBS = 20  # the API returns at most twenty alternatives per token


def _check_number(name: str, value: object, low: float, high: float, low_open: bool = False) -> float:
    """`value` as a float, or a ValueError naming `name` and its allowed range."""
    interval = f"{'(' if low_open else '['}{low:g}, {high:g}]"
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or math.isnan(value):
        raise ValueError(f"{name} must be a number in {interval}, got {value!r}")
    if value > high or value < low or (low_open and value == low):
        raise ValueError(f"{name} must be in {interval}, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class SamplingParams:
    """The API's sampling controls, checked when made. The defaults are the API's: plain sampling at temperature 1."""

    temperature: float = 1.0  # 0 is greedy
    top_k: int = 0  # 0 keeps every token
    top_p: float = 1.0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: Mapping[int, float] = field(default_factory=dict)  # token id -> bias
    temperature_last: bool = False  # False: Hugging Face's order; True: llama.cpp's (truncate, then temperature)

    def __post_init__(self) -> None:
        _check_number("temperature", self.temperature, 0, 2)
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 keeps every token), got {self.top_k!r}")
        _check_number("top_p", self.top_p, 0, 1, low_open=True)
        _check_number("min_p", self.min_p, 0, 1)
        _check_number("presence_penalty", self.presence_penalty, -2, 2)
        _check_number("frequency_penalty", self.frequency_penalty, -2, 2)
        if not isinstance(self.logit_bias, Mapping):
            raise ValueError(f"logit_bias must map token ids to biases, got {self.logit_bias!r}")
        for token_id, bias in self.logit_bias.items():
            if isinstance(token_id, bool) or not isinstance(token_id, int) or token_id < 0:
                raise ValueError(f"logit_bias keys must be token ids (integers >= 0), got {token_id!r}")
            _check_number(f"logit_bias[{token_id}]", bias, -100, 100)

    def check_vocabulary(self, vocab_size: int) -> None:
        """Refuse logit bias for a token id the model does not have."""
        unknown = sorted(t for t in self.logit_bias if t >= vocab_size)
        if unknown:
            raise ValueError(f"logit_bias names token ids {unknown}, outside the vocabulary [0, {vocab_size})")


# --- the logits processors: each takes logits (..., vocab) and returns new ones ------------------


def add_logit_bias(logits: torch.Tensor, logit_bias: Mapping[int, float]) -> torch.Tensor:
    """Add each token's bias to its logit."""
    if not logit_bias:
        return logits
    ids = torch.tensor(list(logit_bias), dtype=torch.long, device=logits.device)
    biases = torch.tensor(list(logit_bias.values()), dtype=logits.dtype, device=logits.device)
    return logits.index_add(-1, ids, biases.expand(*logits.shape[:-1], len(ids)))


def apply_penalties(logits: torch.Tensor, counts: torch.Tensor, presence: float, frequency: float) -> torch.Tensor:
    """OpenAI's penalties: `counts` (..., vocab) is how often each token was sampled so far."""
    if presence == 0 and frequency == 0:
        return logits
    return logits - frequency * counts - presence * (counts > 0).to(logits.dtype)


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Divide by the temperature (which must be > 0: temperature 0 is greedy and never divides)."""
    return logits / temperature


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the `k` largest logits (and any tied with the k-th); -inf elsewhere. k = 0 keeps all."""
    if k == 0 or k >= logits.shape[-1]:
        return logits
    kth_largest = logits.topk(k, dim=-1).values[..., -1:]  # (..., 1)
    return logits.masked_fill(logits < kth_largest, -math.inf)


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the most likely tokens until their probability reaches `top_p` (always the first one)."""
    if top_p >= 1:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probabilities = sorted_logits.softmax(dim=-1)
    before = probabilities.cumsum(dim=-1) - probabilities  # probability of the tokens ranked above each
    drop_sorted = before >= top_p  # the first token has 0 before it, so it always stays
    return logits.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), -math.inf)


def min_p_filter(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Keep the tokens at least `min_p` times as likely as the most likely one."""
    if min_p == 0:
        return logits
    probabilities = logits.softmax(dim=-1)
    threshold = min_p * probabilities.amax(dim=-1, keepdim=True)
    return logits.masked_fill(probabilities < threshold, -math.inf)


def process_logits(logits: torch.Tensor, params: SamplingParams, counts: torch.Tensor | None = None) -> torch.Tensor:
    """The whole pipeline on `logits` (..., vocab); at temperature 0 it stops before temperature and truncation."""
    logits = add_logit_bias(logits.float(), params.logit_bias)
    if counts is not None:
        logits = apply_penalties(logits, counts, params.presence_penalty, params.frequency_penalty)
    if params.temperature == 0:
        return logits  # greedy takes the argmax of these
    if not params.temperature_last:
        logits = apply_temperature(logits, params.temperature)
    logits = min_p_filter(top_p_filter(top_k_filter(logits, params.top_k), params.top_p), params.min_p)
    if params.temperature_last:
        logits = apply_temperature(logits, params.temperature)
    return logits


def next_token_probabilities(logits: torch.Tensor, params: SamplingParams, counts: torch.Tensor | None = None) -> torch.Tensor:
    """The distribution the sampler draws from, (..., vocab): one-hot on the argmax at temperature 0."""
    processed = process_logits(logits, params, counts)
    if params.temperature == 0:
        return F.one_hot(processed.argmax(dim=-1), processed.shape[-1]).float()
    return processed.softmax(dim=-1)


def sample_token(probabilities: torch.Tensor, generator: torch.Generator | None = None) -> int:
    """One token id drawn from `probabilities` (vocab,)."""
    return int(torch.multinomial(probabilities, 1, generator=generator))


# --- incremental decoding ------------------------------------------------------------------------


class Decoder:
    """A model run over a growing token sequence, on the KV cache whenever the cache is exact.

    `logits(extra)` returns the next-token logits after the committed tokens and after each prefix of
    `extra` (speculative decoding scores k drafts in one pass); `commit(tokens)` extends the sequence.
    Keys already cached for tokens that were committed are kept; rejected ones are dropped.
    """

    def __init__(self, model: GPT, prompt: Sequence[int], use_cache: bool = True):
        self.model = model
        self.tokens = list(prompt)
        self.use_cache = use_cache
        self.cache = model.new_kv_cache(1) if use_cache else None
        self.cached_tokens: list[int] = []  # the tokens whose keys and values the cache holds
        self.forward_passes = 0

    @torch.no_grad()
    def logits(self, extra: Sequence[int] = ()) -> torch.Tensor:
        """Logits `(len(extra) + 1, vocab)`: row i predicts the token after `tokens + extra[:i]`."""
        sequence = self.tokens + list(extra)
        if len(sequence) > self.model.config.context:
            raise ValueError(f"{len(sequence)} tokens exceed the model's context of {self.model.config.context}")
        self.forward_passes += 1
        if self.cache is None or not cached_keys_stay_exact(self.model.config.rope, len(sequence)):
            # Recompute from now on (the sequence only grows, so the keys stay stale). Each row is scored
            # at its own length: under dynamic NTK the rotation of every position depends on it.
            self.cache = None
            device = self.model.lm_head.weight.device
            rows = [self.model(torch.tensor([sequence[:end]], device=device), last_only=True).logits[0, -1]
                    for end in range(len(self.tokens), len(sequence) + 1)]
            return torch.stack(rows).float()
        reuse = min(_common_prefix(self.cached_tokens, sequence), len(self.tokens) - 1)  # run from the last token on
        self.cache.truncate(reuse)
        new = sequence[reuse:]
        ids = torch.tensor([new], device=self.cache.k.device)
        logits = self.model(ids, kv_cache=self.cache).logits[0].float()  # (len(new), vocab)
        self.cached_tokens = sequence
        return logits[-(len(extra) + 1):]

    def commit(self, tokens: Sequence[int]) -> None:
        """Append `tokens` to the sequence (cached keys of drafts that disagree are dropped at the next pass)."""
        self.tokens += list(tokens)


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens `a` and `b` share."""
    shared = 0
    for x, y in zip(a, b):
        if x != y:
            break
        shared += 1
    return shared


# --- stop sequences and UTF-8-safe text -----------------------------------------------------------


class StopWatcher:
    """Turns token bytes into text, finds stop sequences in it, and says what text is safe to show.

    Text is decoded incrementally, so a character split across tokens appears only once complete.
    The tail that could still be the start of a stop sequence is held back until it is decided.
    """

    def __init__(self, stop: Sequence[str] = ()):
        self.stop = tuple(stop)
        self.text = ""
        self.shown = 0  # characters of `text` already given out
        self.stopped = False
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, token_bytes: bytes) -> str:
        """Add one token's bytes; return the newly safe text (none of a stop sequence or after it)."""
        if self.stopped:
            return ""
        searched_from = max(0, len(self.text) - max((len(s) for s in self.stop), default=0))
        self.text += self._utf8.decode(token_bytes)
        hits = [i for i in (self.text.find(s, searched_from) for s in self.stop) if i >= 0]
        if hits:
            self.stopped = True
            return self._show(min(hits))
        held = max((k for s in self.stop for k in range(1, len(s)) if self.text.endswith(s[:k])), default=0)
        return self._show(len(self.text) - held)

    def finish(self) -> str:
        """The rest of the text at the end of decoding (an unfinished character becomes U+FFFD)."""
        if self.stopped:
            return ""
        self.text += self._utf8.decode(b"", final=True)
        return self._show(len(self.text))

    def _show(self, end: int) -> str:
        delta, self.shown = self.text[self.shown : end], max(self.shown, end)
        return delta


# --- completions ----------------------------------------------------------------------------------


class TokenLogprob(NamedTuple):
    token_id: int
    token: bytes  # a token may hold part of a UTF-8 character, so the API reports bytes too
    logprob: float  # under the model's own distribution (before any processor)
    top_logprobs: list[tuple[int, float]]  # the most likely alternatives at this position


@dataclass
class Choice:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (a stop sequence, the end-of-text token, or a finished structure) or "length"
    logprobs: list[TokenLogprob] | None = None


@dataclass
class Completion:
    choices: list[Choice]
    prompt_tokens: int
    completion_tokens: int  # over all choices, as the API bills them


class StreamChunk(NamedTuple):
    text: str  # never half a character, never any of a stop sequence
    finish_reason: str | None  # set on the last chunk only


def _prompt_ids(tokenizer: Tokenizer, prompt: str | Sequence[int]) -> list[int]:
    """Token ids of a prompt given as text (special-token text refused) or as ids."""
    if isinstance(prompt, str):
        ids = tokenizer.encode(prompt)  # raises on text spelling a special token
    else:
        ids = [int(t) for t in (prompt.flatten().tolist() if isinstance(prompt, torch.Tensor) else prompt)]
    if not ids:
        raise ValueError("the prompt is empty; give at least one token")
    return ids


def _check_request(model: GPT, prompt_length: int, max_tokens: int | None, n: int, stop: Sequence[str],
                   top_logprobs: int) -> tuple[int, tuple[str, ...]]:
    """The request's max_tokens (default: the rest of the context) and stop tuple, or a clear error."""
    context = model.config.context
    if prompt_length >= context:
        raise ValueError(f"the prompt has {prompt_length} tokens, which leaves no room in the model's context of "
                         f"{context} tokens; shorten it (it is never truncated for you)")
    if max_tokens is None:
        max_tokens = context - prompt_length
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise ValueError(f"max_tokens must be a positive integer, got {max_tokens!r}")
    if prompt_length + max_tokens > context:
        raise ValueError(f"a {prompt_length}-token prompt plus max_tokens={max_tokens} exceeds the model's context of "
                         f"{context} tokens; ask for at most {max(context - prompt_length, 0)} tokens or shorten the prompt")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an integer >= 1, got {n!r}")
    stop = (stop,) if isinstance(stop, str) else tuple(stop)
    if len(stop) > MAX_STOP_SEQUENCES or not all(isinstance(s, str) and s for s in stop):
        raise ValueError(f"stop must be up to {MAX_STOP_SEQUENCES} non-empty strings, got {stop!r}")
    if isinstance(top_logprobs, bool) or not isinstance(top_logprobs, int) or not 0 <= top_logprobs <= MAX_TOP_LOGPROBS:
        raise ValueError(f"top_logprobs must be an integer from 0 to {MAX_TOP_LOGPROBS}, got {top_logprobs!r}")
    return max_tokens, stop


class _Step(NamedTuple):
    token_id: int | None  # None on the final step, which only carries the finish reason
    logprob: TokenLogprob | None
    text: str
    finish_reason: str | None


def _decode_choice(model: GPT, tokenizer: Tokenizer, prompt: list[int], params: SamplingParams, max_tokens: int,
                   stop: tuple[str, ...], generator: torch.Generator | None, top_logprobs: int,
                   constraint=None, use_cache: bool = True) -> Iterator[_Step]:
    """One completion, token by token; the last step gives the rest of the text and the finish reason.

    A `constraint` (see `minigpt.structured.TokenConstraint`) masks every token that cannot continue
    a valid output; the end-of-text token is then allowed only where the output is complete.
    """
    decoder, watcher = Decoder(model, prompt, use_cache), StopWatcher(stop)
    end_of_text = tokenizer.special_tokens.get(END_OF_TEXT)
    counts = torch.zeros(model.config.vocab_size)
    state = constraint.start() if constraint is not None else None
    for _ in range(max_tokens):
        logits = decoder.logits()[-1]  # (vocab,)
        processed = process_logits(logits, params, counts)
        if constraint is not None:
            processed = processed.masked_fill(~constraint.allowed(state), -math.inf)
        if params.temperature == 0:
            token = int(processed.argmax())
        else:
            token = sample_token(processed.softmax(dim=-1), generator)
        if token == end_of_text:
            break
        decoder.commit([token])
        counts[token] += 1
        token_bytes, logprob = tokenizer.decode_tokens_bytes([token])[0], None
        if top_logprobs is not None:
            log_probabilities = logits.log_softmax(dim=-1)
            top = log_probabilities.topk(top_logprobs) if top_logprobs else None
            logprob = TokenLogprob(token, token_bytes, float(log_probabilities[token]),
                                   [] if top is None else list(zip(top.indices.tolist(), top.values.tolist())))
        yield _Step(token, logprob, watcher.feed(token_bytes), None)
        if watcher.stopped:
            break
        if constraint is not None:
            state = constraint.advance(state, token)
            if constraint.is_finished(state):
                break
    else:
        yield _Step(None, None, watcher.finish(), "length")
        return
    yield _Step(None, None, watcher.finish(), "stop")


def complete(model: GPT, tokenizer: Tokenizer, prompt: str | Sequence[int], *, max_tokens: int | None = None,
             n: int = 1, seed: int | None = None, stop: str | Sequence[str] = (), logprobs: bool = False,
             top_logprobs: int = 0, params: SamplingParams = SamplingParams(), constraint=None,
             use_cache: bool = True) -> Completion:
    """A completion request in the API's shape: `n` choices, each with text, tokens and finish reason.

    The same `seed` gives the same choices. `stop` text ends a choice and is not returned. With
    `logprobs`, each token comes with its log-probability and its `top_logprobs` best alternatives.
    """
    ids = _prompt_ids(tokenizer, prompt)
    max_tokens, stop = _check_request(model, len(ids), max_tokens, n, stop, top_logprobs)
    params.check_vocabulary(model.config.vocab_size)
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    choices = []
    for index in range(n):
        steps = list(_decode_choice(model, tokenizer, ids, params, max_tokens, stop, generator,
                                    top_logprobs if logprobs else None, constraint, use_cache))
        tokens = [s.token_id for s in steps if s.token_id is not None]
        choices.append(Choice(index, "".join(s.text for s in steps), tokens, steps[-1].finish_reason,
                              [s.logprob for s in steps if s.logprob is not None] if logprobs else None))
    return Completion(choices, len(ids), sum(len(c.token_ids) for c in choices))


def stream(model: GPT, tokenizer: Tokenizer, prompt: str | Sequence[int], *, max_tokens: int | None = None,
           seed: int | None = None, stop: str | Sequence[str] = (), params: SamplingParams = SamplingParams(),
           constraint=None, use_cache: bool = True) -> Iterator[StreamChunk]:
    """One completion as it is decoded: text chunks (whole characters only), then the finish reason."""
    ids = _prompt_ids(tokenizer, prompt)
    max_tokens, stop = _check_request(model, len(ids), max_tokens, 1, stop, 0)
    params.check_vocabulary(model.config.vocab_size)
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    for step in _decode_choice(model, tokenizer, ids, params, max_tokens, stop, generator, None, constraint, use_cache):
        if step.text or step.finish_reason:
            yield StreamChunk(step.text, step.finish_reason)


# --- beam search ----------------------------------------------------------------------------------


class Beam(NamedTuple):
    token_ids: list[int]  # the continuation only
    logprob: float  # its total log-probability
    score: float  # logprob / length ** length_penalty: what the search ranks by


def _beam_score(logprob: float, length: int, length_penalty: float) -> float:
    return logprob / max(length, 1) ** length_penalty


@torch.no_grad()
def beam_search(model: GPT, prompt: Sequence[int], num_beams: int = 4, max_tokens: int = 20,
                length_penalty: float = 1.0, end_token: int | None = None) -> list[Beam]:
    """The `num_beams` most likely continuations found by beam search, best first (deterministic).

    Each step extends every beam by every token and keeps the `num_beams` best totals. A beam that
    emits `end_token` is finished; the search stops when `num_beams` beams are finished or at
    `max_tokens`. Ranking divides the summed log-probability by `length ** length_penalty`
    (Hugging Face's rule): above 0 it favours longer outputs, 0 ranks by total probability.
    """
    vocab = model.config.vocab_size
    if isinstance(num_beams, bool) or not isinstance(num_beams, int) or not 1 <= num_beams < vocab:
        raise ValueError(f"num_beams must be an integer from 1 to {vocab - 1} (below the vocabulary), got {num_beams!r}")
    _check_number("length_penalty", length_penalty, -10, 10)
    prompt = list(prompt)
    max_tokens, _ = _check_request(model, len(prompt), max_tokens, 1, (), 0)
    device = model.lm_head.weight.device
    sequences = torch.tensor([prompt], device=device)  # (beams, T): one row until the first step
    totals = torch.zeros(1, device=device)  # (beams,) summed log-probabilities
    cache, finished = model.new_kv_cache(num_beams), []
    step_input = sequences.expand(num_beams, -1)  # the cache holds one copy of the prompt per beam
    for _ in range(max_tokens):
        if cache is not None and not cached_keys_stay_exact(model.config.rope, sequences.shape[1]):
            cache, step_input = None, sequences  # dynamic NTK past its context: recompute
        logits = model(step_input, kv_cache=cache, last_only=True).logits[: len(sequences), -1]  # (beams, vocab)
        candidates = (totals[:, None] + logits.float().log_softmax(dim=-1)).flatten()  # (beams * vocab,)
        # Each beam ends at most once, so the best 2 * num_beams always hold num_beams that go on.
        best = candidates.topk(min(2 * num_beams, len(candidates)))
        rows, tokens, kept_totals = [], [], []
        for total, flat in zip(best.values.tolist(), best.indices.tolist()):
            row, token = divmod(flat, vocab)
            if token == end_token:
                continuation = sequences[row, len(prompt):].tolist() + [token]
                finished.append(Beam(continuation, total, _beam_score(total, len(continuation), length_penalty)))
            elif len(rows) < num_beams:
                rows.append(row), tokens.append(token), kept_totals.append(total)
        if len(finished) >= num_beams:
            return sorted(finished, key=lambda beam: beam.score, reverse=True)[:num_beams]
        rows = torch.tensor(rows, device=device)
        sequences = torch.cat([sequences[rows], torch.tensor(tokens, device=device)[:, None]], dim=1)
        totals = torch.tensor(kept_totals, device=device)
        if cache is not None:
            cache.reorder(rows)  # each surviving beam takes its parent's keys and values
        step_input = sequences[:, -1:] if cache is not None else sequences
    open_beams = [Beam(s[len(prompt):], t, _beam_score(t, max_tokens, length_penalty))
                  for s, t in zip(sequences.tolist(), totals.tolist())]
    return sorted(finished + open_beams, key=lambda beam: beam.score, reverse=True)[:num_beams]
