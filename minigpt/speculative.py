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

A draft trained on the corpus agrees with the target only as often as two different models happen
to. `distill_draft` trains it on the target's own choices instead (the idea of DistillSpec, Zhou et
al. 2023): the target continues prompts greedily, and the draft learns to predict the target's
argmax at every position. Run it as

    python -m minigpt.speculative distill --target data/checkpoints/full.pt --draft data/checkpoints/nano.pt
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, Protocol

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from minigpt.model import GPT
from minigpt.sampler import Decoder, SamplingParams, next_token_probabilities, process_logits, sample_token


class Draft(NamedTuple):
    tokens: list[int]
    probabilities: torch.Tensor | None  # (len(tokens), vocab): the q each was drawn from; None for a fixed guess


class Drafter(Protocol):
    def propose(self, sequence: list[int], k: int, params: SamplingParams, counts: torch.Tensor,
                generator: torch.Generator | None) -> Draft: ...


class ModelDrafter:
    """Drafts by sampling a smaller model with the same sampling parameters (KV cache kept between rounds).

    With `min_confidence` > 0 a round's draft ends early, after a token the draft itself gave less
    than that probability (its softmax, at temperature 1 when greedy): such a token is often
    rejected, and the steps drafted after it would be wasted (Hugging Face's assisted generation
    does the same with `assistant_confidence_threshold`).
    """

    def __init__(self, model: GPT, min_confidence: float = 0.0):
        if not 0 <= min_confidence <= 1:
            raise ValueError(f"min_confidence must be a probability in [0, 1], got {min_confidence!r}")
        self.model, self.min_confidence = model, min_confidence
        self.decoder: Decoder | None = None

    def propose(self, sequence, k, params, counts, generator) -> Draft:
        if self.decoder is None:
            self.decoder = Decoder(self.model, sequence)
        self.decoder.tokens = list(sequence)  # the cache keeps whatever prefix still agrees
        tokens, rows, counts = [], [], counts.clone()
        for _ in range(k):
            logits = self.decoder.logits()[-1]  # (vocab,)
            q = next_token_probabilities(logits, params, counts)
            token = int(q.argmax()) if params.temperature == 0 else sample_token(q, generator)
            tokens.append(token), rows.append(q)
            self.decoder.commit([token])  # each step runs only the new token (the next round resets the sequence)
            if self.min_confidence and self._confidence(logits, q, token, params, counts) < self.min_confidence:
                break
            counts[token] += 1
        return Draft(tokens, torch.stack(rows) if rows else None)

    @staticmethod
    def _confidence(logits, q, token, params, counts) -> float:
        """The draft's probability of `token`: q's, or when greedy (q one-hot) its softmax at temperature 1."""
        if params.temperature > 0:
            return float(q[token])
        return float(process_logits(logits, params, counts).softmax(dim=-1)[token])


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


def predicted_speedup(alpha: float, k: int, cost_ratio: float, verify_cost: float = 1.0) -> float:
    """Leviathan et al.'s predicted wall-clock speed-up: tokens per pass over the round's cost `k * c + 1`.

    They take scoring k + 1 positions to cost one target pass. `verify_cost` is that cost measured,
    in single-token passes (a little above 1 on a CPU): the round then costs `k * c + verify_cost`.
    """
    return expected_tokens_per_pass(alpha, k) / (k * cost_ratio + verify_cost)


def _judge(p: torch.Tensor, q: torch.Tensor | None, token: int, params: SamplingParams,
           generator: torch.Generator | None) -> int | None:
    """None if draft `token` is kept, else the target's replacement drawn from the residual.

    `p` and `q` are the target's and draft's distributions (vocab,); q None is a fixed guess (a point mass).
    """
    if params.temperature == 0:
        target = int(p.argmax())
        return None if target == token else target
    q = F.one_hot(torch.tensor(token), len(p)).float() if q is None else q
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


# --- a draft trained to agree with its target -------------------------------------------------------


@torch.no_grad()
def target_choices(target: GPT, prompts: torch.Tensor, new_tokens: int, batch_size: int = 64,
                   progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The target's greedy continuations of `prompts` `(N, P)` by `new_tokens`, and its argmax after
    every position of them: inputs and labels `(N, P + new_tokens - 1)` for `distill_draft`."""
    if prompts.ndim != 2 or prompts.shape[1] < 1:
        raise ValueError(f"prompts must be token ids of shape (N, P) with P >= 1, got {tuple(prompts.shape)}")
    was_training = target.training
    target.eval()
    inputs, labels = [], []
    for start in tqdm(range(0, len(prompts), batch_size), desc="target continuations", disable=not progress):
        sequences = target.generate(prompts[start : start + batch_size], new_tokens)[:, :-1]
        inputs.append(sequences)
        labels.append(target(sequences).logits.argmax(dim=-1))  # (batch, P + new_tokens - 1)
    target.train(was_training)
    return torch.cat(inputs), torch.cat(labels)


def agreement(draft: GPT, inputs: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of positions where the draft's argmax equals `labels` (the target's): the greedy acceptance rate."""
    was_training = draft.training
    draft.eval()
    with torch.no_grad():
        agreed = sum((draft(x[None]).logits[0].argmax(dim=-1) == y).sum().item() for x, y in zip(inputs, labels))
    draft.train(was_training)
    return agreed / labels.numel()


def distill_draft(draft: GPT, inputs: torch.Tensor, labels: torch.Tensor, steps: int, batch_size: int = 32,
                  learning_rate: float = 1e-3, seed: int = 0, progress: bool = False) -> list[float]:
    """Train `draft` in place to predict the target's choices `labels` on `inputs` (from
    `target_choices`): cross-entropy on the target's argmax, linear warmup then cosine decay to a
    tenth. Returns the loss at every step."""
    from minigpt.train import TrainConfig, optimizer_step, weight_decay_groups  # train does not import this module
    from minigpt.train import learning_rate as scheduled_rate

    if len(inputs) < batch_size:
        raise ValueError(f"batch_size ({batch_size}) is more than the {len(inputs)} sequences to train on")
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(weight_decay_groups(draft, 0.1), lr=learning_rate, betas=(0.9, 0.95))
    schedule = TrainConfig(steps=steps, warmup_steps=max(1, steps // 20), learning_rate=learning_rate,
                           min_learning_rate=learning_rate / 10)
    losses = []
    draft.train()
    for step in tqdm(range(steps), desc="distilling the draft", disable=not progress):
        for group in optimizer.param_groups:
            group["lr"] = scheduled_rate(step, schedule)
        rows = torch.randint(len(inputs), (batch_size,), generator=generator)
        loss = draft(inputs[rows], labels[rows]).loss
        optimizer_step(draft, optimizer, loss, grad_clip=1.0)
        losses.append(loss.item())
    draft.eval()
    return losses


def main(argv: list[str] | None = None) -> None:
    """`python -m minigpt.speculative distill`: train a draft on its target's choices and save it."""
    from minigpt.train import CHECKPOINT_DIR, TrainConfig, corpus_tokens, load_checkpoint, save_checkpoint

    parser = argparse.ArgumentParser(prog="python -m minigpt.speculative", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    distill = commands.add_parser("distill", help="train a draft model to agree with its target")
    distill.add_argument("--target", type=Path, default=CHECKPOINT_DIR / "full.pt")
    distill.add_argument("--draft", type=Path, default=CHECKPOINT_DIR / "nano.pt", help="the draft to start from")
    distill.add_argument("--prompts", type=int, default=6144, help="training prompts, windows of the training split")
    distill.add_argument("--prompt-tokens", type=int, default=32)
    distill.add_argument("--new-tokens", type=int, default=96, help="greedy tokens the target adds to each prompt")
    distill.add_argument("--steps", type=int, default=2000)
    distill.add_argument("--batch-size", type=int, default=32)
    distill.add_argument("--learning-rate", type=float, default=1e-3)
    distill.add_argument("--seed", type=int, default=0)
    distill.add_argument("--out", type=Path, default=CHECKPOINT_DIR / "nano-draft.pt")
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    target, _ = load_checkpoint(args.target)
    draft, draft_checkpoint = load_checkpoint(args.draft)
    if draft.config.tokenizer != target.config.tokenizer:
        parser.error(f"the draft uses tokenizer {draft.config.tokenizer!r} and the target {target.config.tokenizer!r}; "
                     "a draft must share its target's tokens")
    length = args.prompt_tokens
    generator = torch.Generator().manual_seed(args.seed)
    prompts = {}
    for split, n in (("train", args.prompts), ("val", 64)):
        tokens = corpus_tokens(split, target.config.tokenizer)
        starts = torch.randint(len(tokens) - length, (n,), generator=generator).tolist()
        prompts[split] = torch.stack([tokens[s : s + length] for s in starts])
    train_inputs, train_labels = target_choices(target, prompts["train"], args.new_tokens, progress=True)
    val_inputs, val_labels = target_choices(target, prompts["val"], args.new_tokens)
    before = agreement(draft, val_inputs, val_labels)
    losses = distill_draft(draft, train_inputs, train_labels, args.steps, args.batch_size, args.learning_rate,
                           args.seed, progress=True)
    after = agreement(draft, val_inputs, val_labels)
    print(f"agreement with the target's argmax on held-out continuations: {before:.3f} before, {after:.3f} after")
    config = TrainConfig(preset=json.loads(draft_checkpoint["train_config"])["preset"], steps=args.steps, batch_size=args.batch_size,
                         learning_rate=args.learning_rate, seed=args.seed, init_from=str(args.draft))
    history = {"step": list(range(1, args.steps + 1)), "train_loss": losses, "agreement_before": before,
               "agreement_after": after, "target": str(args.target)}
    command = "python -m minigpt.speculative " + " ".join(sys.argv[1:] if argv is None else argv)
    save_checkpoint(args.out, draft, None, args.steps, config, history, dtype="float16", command=command)
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
