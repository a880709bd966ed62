"""Checks for the exercises of notebook 06 (the sampler).

1. `check_top_p`: nucleus filtering of a logit vector, against `minigpt.sampler.top_p_filter`.
2. `check_speculative_judge`: the speculative acceptance rule and its residual distribution, against
   the rule in `minigpt.speculative`.
3. `check_stop_sequence`: the text of a stream of chunks up to a stop sequence that may span chunks,
   against `minigpt.sampler.StopWatcher`.

Every expected value is computed here with the package's own code; no hint contains one.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from minigpt.exercises import CheckResult, call, call_for_tensor, not_yet, right
from minigpt.sampler import StopWatcher, top_p_filter

TOP_P = "Exercise 1 (top-p)"
JUDGE = "Exercise 2 (the speculative acceptance rule)"
STOP = "Exercise 3 (a stop sequence across chunks)"


def _same_filter(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same kept set (finite entries) with the same values there."""
    kept_a, kept_b = torch.isfinite(a), torch.isfinite(b)
    return a.shape == b.shape and torch.equal(kept_a, kept_b) and torch.allclose(a[kept_a], b[kept_b], atol=1e-6)


# --- Exercise 1: top-p -----------------------------------------------------------------------

TOP_P_CASES = [  # (logits, top_p): probabilities chosen so each boundary is clear of rounding
    (torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05])), 0.7),  # 0.5 < 0.7, 0.8 >= 0.7: keep two
    (torch.log(torch.tensor([0.1, 0.6, 0.3])), 0.5),  # the top token alone reaches 0.5, out of order
    (torch.log(torch.tensor([0.25, 0.05, 0.4, 0.3])), 0.9),  # three needed; order scrambled
    (torch.log(torch.tensor([0.2, 0.2, 0.2, 0.2, 0.2])), 0.3),
    (torch.tensor([2.0, -1.0, 0.5, 3.0, 0.0, 1.0]), 0.95),
    (torch.tensor([4.0, 0.0, 0.0, 0.0]), 0.2),  # below the top token's probability: keep just it
]


def _top_p_mistakes(logits: torch.Tensor, top_p: float) -> list[tuple[torch.Tensor, str]]:
    """What the typical wrong answers return, each with the hint that names its mistake."""
    sorted_logits, order = logits.sort(descending=True)
    probabilities = sorted_logits.softmax(-1)
    cumulative = probabilities.cumsum(-1)

    def unsort(drop_sorted: torch.Tensor) -> torch.Tensor:
        return logits.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), -math.inf)

    return [
        (unsort(cumulative > top_p),
         "a token whose own probability takes the running total past top_p is the one that reaches it: keep it "
         "too. Decide by the probability of the tokens ranked above each one."),
        (logits.masked_fill(logits.softmax(-1) < 1 - top_p, -math.inf),
         "top-p is not a threshold on each token's own probability: sort the tokens, most likely first, and "
         "keep them until their total reaches top_p."),
        (top_p_filter(logits, top_p).softmax(-1), "return filtered logits (dropped tokens at -inf), not probabilities."),
    ]


def check_top_p(top_p_fn: Callable[[torch.Tensor, float], torch.Tensor]) -> CheckResult:
    """Exercise 1: `top_p_fn(logits, top_p)` with `logits` `(vocab,)` must return the logits with every
    token outside the nucleus set to -inf and the rest unchanged, in the original order: the most
    likely tokens, kept until the probability of those ranked above the next one reaches `top_p`."""
    for logits, top_p in TOP_P_CASES:
        result, verdict = call_for_tensor(TOP_P, top_p_fn, logits.clone(), top_p)
        if verdict is not None:
            return verdict
        expected = top_p_filter(logits, top_p)
        if result.shape != expected.shape:
            return not_yet(TOP_P, f"return one logit per token, shape {tuple(logits.shape)}; got {tuple(result.shape)}.")
        if _same_filter(result.float(), expected):
            continue
        for mistake, hint in _top_p_mistakes(logits, top_p):
            if _same_filter(result.float(), mistake):
                return not_yet(TOP_P, hint)
        if torch.equal(torch.isfinite(result).sort().values, torch.isfinite(expected).sort().values):
            return not_yet(TOP_P, "you keep the right number of tokens but not the right ones: put each kept "
                                  "logit back at its token's position (sorting reorders them).")
        return not_yet(TOP_P, f"with top_p = {top_p} on {len(logits)} tokens the kept set is wrong: keep the "
                              "most likely tokens, then the next, while the total probability of those "
                              "already kept is below top_p; leave kept logits unchanged.")
    return right(TOP_P)


# --- Exercise 2: the speculative acceptance rule ------------------------------------------------

def reference_judge(p: torch.Tensor, q: torch.Tensor, token: int, u: float) -> torch.Tensor | bool:
    """True if draft `token` is kept given the uniform draw `u`; else the residual distribution."""
    if u < min(1.0, float(p[token] / q[token])):
        return True
    residual = (p - q).clamp(min=0)
    return residual / residual.sum()


JUDGE_CASES = [  # (p, q, token, u)
    (torch.tensor([0.5, 0.3, 0.2]), torch.tensor([0.2, 0.6, 0.2]), 1, 0.4),  # p/q = 0.5 >= u: kept
    (torch.tensor([0.5, 0.3, 0.2]), torch.tensor([0.2, 0.6, 0.2]), 1, 0.7),  # rejected: residual
    (torch.tensor([0.5, 0.3, 0.2]), torch.tensor([0.2, 0.6, 0.2]), 0, 0.99),  # p > q: always kept
    (torch.tensor([0.1, 0.1, 0.4, 0.4]), torch.tensor([0.7, 0.1, 0.1, 0.1]), 0, 0.2),  # 1/7 < 0.2: rejected
    (torch.tensor([0.25, 0.25, 0.25, 0.25]), torch.tensor([0.0, 1.0, 0.0, 0.0]), 1, 0.3),  # a fixed guess: p(x) = 0.25
    (torch.tensor([0.6, 0.1, 0.3]), torch.tensor([0.0, 1.0, 0.0]), 1, 0.05),  # kept: u < p(x)
]


def _is_kept(result: object) -> bool:
    """Whether the reader's answer says "kept": True, or a one-element tensor holding True."""
    if isinstance(result, torch.Tensor):
        return result.numel() == 1 and result.dtype == torch.bool and bool(result)
    return result is True


def _close(result: object, expected: torch.Tensor) -> bool:
    return (isinstance(result, torch.Tensor) and result.shape == expected.shape
            and torch.allclose(result.float(), expected.float(), atol=1e-6))


def _judge_hint(result: object, p: torch.Tensor, q: torch.Tensor, token: int, u: float) -> str:
    """The hint for a wrong answer: the typical mistake it matches, or what the rule says here."""
    keep = u < min(1.0, float(p[token] / q[token]))
    keep_inverted = p[token] > 0 and u < min(1.0, float(q[token] / p[token]))
    if _is_kept(result) != keep and _is_kept(result) == keep_inverted:
        return ("the ratio is the target's probability over the draft's, p(x) / q(x): a token the draft "
                "proposes more often than the target would choose it must be kept less often.")
    if keep:
        return (f"with p(x) = {float(p[token]):.2f}, q(x) = {float(q[token]):.2f} and u = {u} the draft token is "
                "kept: return True then.")
    if _is_kept(result):
        return (f"with p(x) = {float(p[token]):.2f}, q(x) = {float(q[token]):.2f} and u = {u} the token is "
                "rejected: keep it only when u < min(1, p(x) / q(x)).")
    residual = (p - q).clamp(min=0)
    if _close(result, residual):
        return "the residual max(0, p - q) must be normalised to sum to 1."
    if _close(result, p):
        return ("after a rejection, sample from the residual max(0, p - q), normalised, not from p: p would count "
                "again the probability that keeping drafts already gave.")
    if _close(result, (p - q).abs() / (p - q).abs().sum()):
        return "the residual keeps only where the target exceeds the draft: max(0, p - q), not |p - q|."
    return ("on a rejection, return the residual distribution as a tensor over the vocabulary: max(0, p - q), "
            "divided by its sum.")


def check_speculative_judge(judge_fn: Callable[[torch.Tensor, torch.Tensor, int, float], object]) -> CheckResult:
    """Exercise 2: `judge_fn(p, q, token, u)`, with the target's and the draft's distributions `p`, `q`
    `(vocab,)`, the draft `token` and a uniform draw `u` in [0, 1), must return True when the token is
    kept (u < min(1, p(x) / q(x))), else the residual distribution max(0, p - q) normalised to sum to 1."""
    for p, q, token, u in JUDGE_CASES:
        result, verdict = call(JUDGE, judge_fn, p.clone(), q.clone(), token, u)
        if verdict is not None:
            return verdict
        expected = reference_judge(p, q, token, u)
        right_answer = _is_kept(result) if expected is True else _close(result, expected)
        if not right_answer:
            return not_yet(JUDGE, _judge_hint(result, p, q, token, u))
    return right(JUDGE)


# --- Exercise 3: a stop sequence across chunks -------------------------------------------------

STOP_CASES = [  # (chunks, stop)
    (["Good morrow", ", sweet ", "Kate.\n\nPET", "RUCHIO:"], "\n\n"),  # inside one chunk
    (["To be, or not", " to be", ": that is", " the question"], "to be:"),  # spans two chunks
    (["I am ", "a ma", "n, and I", " am"], "man,"),  # starts mid-chunk, ends mid-chunk
    (["ab", "c", "d", "ef"], "bcde"),  # spans four chunks
    (["no stop ", "in this ", "one"], "END"),  # never appears: all the text
    (["a false st", "art, then the ", "stop: here"], "stop:"),  # a partial match first
]


def reference_stop_text(chunks: Sequence[str], stop: str) -> str:
    watcher = StopWatcher([stop])
    text = "".join(watcher.feed(chunk.encode("utf-8")) for chunk in chunks)
    return text + watcher.finish()


def check_stop_sequence(stop_fn: Callable[[list[str], str], str]) -> CheckResult:
    """Exercise 3: `stop_fn(chunks, stop)` must return the text the chunks spell up to (not including)
    the first occurrence of `stop`, which may span several chunks; all the text if `stop` never occurs."""
    for chunks, stop in STOP_CASES:
        result, verdict = call(STOP, stop_fn, list(chunks), stop)
        if verdict is not None:
            return verdict
        if not isinstance(result, str):
            return not_yet(STOP, f"return the text as a str (got a {type(result).__name__}).")
        expected = reference_stop_text(chunks, stop)
        if result == expected:
            continue
        if result == expected + stop:
            return not_yet(STOP, "the stop sequence itself is not returned: cut the text where it begins.")
        if result == "".join(chunks):
            return not_yet(STOP, f"the stop {stop!r} spans chunks in {chunks!r}: look for it in the text so far, "
                                 "not in each chunk alone.")
        return not_yet(STOP, f"for chunks {chunks!r} and stop {stop!r} the text is wrong: join the chunks, find "
                             "the first occurrence of the stop, and return what comes before it.")
    return right(STOP)
