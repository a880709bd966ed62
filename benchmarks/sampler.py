"""Sampler benchmarks: every figure beside its baseline, measured in the same run.

    python benchmarks/sampler.py        # about 3 minutes on a 2-core laptop

1. Draft-model speculative decoding against plain greedy decoding of the same target (`full`),
   identical output, with the acceptance rate, the cost ratio and Leviathan et al.'s predicted
   speed-up. The draft is `nano-draft`, `nano` distilled on `full`'s own choices
   (`python -m minigpt.speculative distill`); `nano` as trained on the corpus is shown beside it,
   and so is `nano-draft` ending a round's draft after a token it gives less than `--min-confidence`
   probability (`ModelDrafter`'s `min_confidence`). Plain and speculative decoding take turns on
   each prompt, so a slow spell of the machine falls on both. Also what verifying k + 1 positions
   costs in single-token passes, with the model's few-row projection (`minigpt.model.project`) and
   with `F.linear` throughout. Goal: >= 1.5x.
2. Predicted outputs on the editing task (the caller's original text is the draft) against plain
   greedy decoding by `mini-edit`, identical output; prompt-lookup decoding beside it, and how many
   of the edits the model gets exactly right. Goal: >= 3x.
3. Time to first token of a prompt whose 1,000-token prefix is in the prompt cache, against a cold
   prefill of the same prompt, each model stretched with YaRN to 2,048 tokens to hold it. Goal
   (on `full`): <= 0.1. `mini` is shown beside it: a smaller model's cold prefill is cheaper while
   the cached one still pays a whole pass of per-layer overhead, so its ratio is higher.
4. JSON-schema-constrained decoding against unconstrained decoding by `mini`, tokens per second,
   masks cached. Goal: >= 0.8.

Timings are the best of `--repeats` runs, on `--threads` threads (1 by default): decoding one
sequence with models this small is a chain of tiny operations, which a second thread does not speed
up and whose timings it makes erratic. Baselines and speed-ups always run on the same threads.
"""

from __future__ import annotations

import argparse
import math
import random
import time
from pathlib import Path

import torch

import minigpt.model as model_module
from minigpt import data, sampler, speculative
from minigpt.long_context import stretch
from minigpt.model import GPT
from minigpt.prompt_cache import PromptCache
from minigpt.structured import TokenConstraint
from minigpt.train import CHECKPOINT_DIR, corpus_tokens, load_checkpoint, load_tokenizer

RECORD_SCHEMA = {"type": "object", "properties": {
    "speaker": {"enum": ["ROMEO", "JULIET", "NURSE"]},
    "line": {"type": "string", "maxLength": 24},
    "act": {"type": "integer", "minimum": 0},
    "moods": {"type": "array", "items": {"enum": ["merry", "sad", "angry"]}, "maxItems": 3}}}
SPECULATIVE_PROMPTS = ("ROMEO:\n", "KING HENRY V:\n", "JULIET:\nO Romeo, Romeo!", "HAMLET:\nTo be, or not to be")


def timed(run):
    """Seconds `run()` took, and its result."""
    start = time.perf_counter()
    result = run()
    return time.perf_counter() - start, result


def fastest(measures: dict, repeats: int) -> dict:
    """Each measurement's smallest value over `repeats` rounds that take them in turn, so a slow spell
    of the machine falls on all of them (the measurements return seconds)."""
    best = {name: math.inf for name in measures}
    for _ in range(repeats):
        for name, measure in measures.items():
            best[name] = min(best[name], measure())
    return best


def best_seconds(run, repeats: int):
    """The fastest of `repeats` runs of `run()`, and its result."""
    best, result = math.inf, None
    for _ in range(repeats):
        seconds, result = timed(run)
        best = min(best, seconds)
    return best, result


def greedy(model: GPT, prompt: list[int], n: int) -> list[int]:
    """`n` greedy tokens after `prompt`, by the model's own cached decoding."""
    return model.generate(torch.tensor([prompt]), n)[0, len(prompt):].tolist()


@torch.no_grad()
def verify_pass(model: GPT, prompt: list[int], n_positions: int, repeats: int = 20) -> float:
    """Seconds for one cached pass that scores `n_positions` new positions (the average of `repeats`)."""
    decoder = sampler.Decoder(model, prompt)
    decoder.logits()
    start = time.perf_counter()
    for _ in range(repeats):
        decoder.cached_tokens = decoder.cached_tokens[: len(prompt)]
        decoder.logits(list(range(1, n_positions)))  # the last prompt token and n_positions - 1 drafts
    return (time.perf_counter() - start) / repeats


def with_linear(measure):
    """`measure()` with every projection through `F.linear`: the baseline for `minigpt.model.project`."""
    saved, model_module.FEW_ROWS = model_module.FEW_ROWS, 1
    try:
        return measure()
    finally:
        model_module.FEW_ROWS = saved


def draft_model_speedup(target: GPT, drafts: dict[str, tuple[GPT, float]], prompts: list[list[int]], n: int, k: int,
                        repeats: int) -> None:
    """Speculative decoding of `target` with each draft (a model and its `min_confidence`) against
    plain greedy decoding of `target`.

    Each repeat times plain decoding and then every draft on the same prompt, so a slow spell of the
    machine falls on the baseline and the speed-up alike; each figure is the best of its repeats.
    """
    plain, speculative_seconds = [math.inf] * len(prompts), {name: [math.inf] * len(prompts) for name in drafts}
    results = {name: [] for name in drafts}
    for i, prompt in enumerate(prompts):
        reference = greedy(target, prompt, n)
        for repeat in range(repeats):
            plain[i] = min(plain[i], timed(lambda: greedy(target, prompt, n))[0])
            for name, (draft, min_confidence) in drafts.items():
                seconds, result = timed(lambda: speculative.speculative_generate(
                    target, speculative.ModelDrafter(draft, min_confidence), prompt, n, k=k))
                assert result.tokens == reference, f"speculative output with {name} differs from full's greedy output"
                speculative_seconds[name][i] = min(speculative_seconds[name][i], seconds)
                if repeat == 0:
                    results[name].append(result)
    passes = fastest({"one": lambda: verify_pass(target, prompts[0], 1),
                      "more": lambda: verify_pass(target, prompts[0], k + 1),
                      "one, F.linear": lambda: with_linear(lambda: verify_pass(target, prompts[0], 1)),
                      "more, F.linear": lambda: with_linear(lambda: verify_pass(target, prompts[0], k + 1))}, repeats)
    verify_cost, linear_verify_cost = passes["more"] / passes["one"], passes["more, F.linear"] / passes["one, F.linear"]
    steps = fastest({"target": lambda: timed(lambda: greedy(target, prompts[0], 32))[0] / 32,
                     **{name: lambda draft=draft: timed(lambda: greedy(draft, prompts[0], 32))[0] / 32
                        for name, (draft, _) in drafts.items()}}, repeats)
    target_step = steps["target"]
    print(f"1. draft-model speculative decoding of full (k={k}), "
          f"{len(prompts)} prompts x {n} tokens, greedy")
    print(f"   plain decoding: {sum(plain):.2f} s ({target_step * 1e3:.1f} ms per token)")
    print(f"   verifying {k + 1} positions in one pass costs {verify_cost:.2f} single-token passes "
          f"({linear_verify_cost:.2f} with F.linear for every row count)")
    for name, (draft, _) in drafts.items():
        total, runs = sum(speculative_seconds[name]), results[name]
        draft_step = steps[name]
        judged = sum(min(r.accepted + 1, len(r.drafted)) for result in runs for r in result.rounds)
        alpha, cost_ratio = sum(result.accepted for result in runs) / judged, draft_step / target_step
        tokens_per_pass = sum(len(r.tokens) for r in runs) / sum(r.target_passes for r in runs)
        drafted_per_round = sum(r.drafted for r in runs) / sum(r.target_passes for r in runs)
        print(f"   draft {name}: {total:.2f} s, {sum(plain) / total:.2f}x, identical output; acceptance {alpha:.2f}, "
              f"{drafted_per_round:.2f} drafted and {tokens_per_pass:.2f} tokens per target pass, cost ratio "
              f"{cost_ratio:.2f}; Leviathan et al. predict {speculative.predicted_speedup(alpha, k, cost_ratio):.2f}x, "
              f"{speculative.predicted_speedup(alpha, k, cost_ratio, verify_cost):.2f}x with the measured verification")
    print("   goal: >= 1.5x with the distilled draft")


def predicted_outputs_speedup(model: GPT, tok, n_requests: int, n_lines: int, k: int, repeats: int) -> None:
    """Predicted outputs and prompt lookup against plain greedy decoding, on held-out edits."""
    plain = predicted = lookup = 0.0
    passes = tokens = exact = 0
    for seed in range(n_requests):
        request = data.edit_probe(random.Random(seed), n_lines, split="val")
        prompt = tok.encode(request.prompt)
        original = tok.encode(request.prompt.split("\n", 1)[1].rsplit("\nEdited:\n", 1)[0])
        n = len(tok.encode(request.answer))
        seconds, reference = best_seconds(lambda: greedy(model, prompt, n), repeats)
        plain += seconds
        exact += tok.decode(reference) == request.answer
        seconds, result = best_seconds(lambda: speculative.speculative_generate(
            model, speculative.PredictionDrafter(original, len(prompt)), prompt, n, k=k), repeats)
        predicted += seconds
        assert result.tokens == reference, "predicted-output decoding differs from plain greedy decoding"
        passes, tokens = passes + result.target_passes, tokens + len(result.tokens)
        seconds, result = best_seconds(lambda: speculative.speculative_generate(
            model, speculative.PromptLookupDrafter(), prompt, n, k=k), repeats)
        lookup += seconds
        assert result.tokens == reference, "prompt-lookup decoding differs from plain greedy decoding"
    print(f"2. predicted outputs on {n_requests} held-out {n_lines}-line edits by mini-edit (k={k}), greedy")
    print(f"   the model's edit exactly right in {exact} of {n_requests}")
    print(f"   plain {plain:.2f} s, predicted outputs {predicted:.2f} s: {plain / predicted:.2f}x (goal >= 3x), "
          f"identical output, {tokens / passes:.2f} tokens per target pass")
    print(f"   prompt lookup {lookup:.2f} s: {plain / lookup:.2f}x, identical output")


def cached_time_to_first_token(models: dict[str, GPT], tok, prefix_tokens: int, repeats: int) -> None:
    """A cache hit's prefill against a cold prefill of the same prompt, for each model."""
    prefix = corpus_tokens("val")[:prefix_tokens].tolist()
    question = tok.encode("\n\nROMEO:\nWhat say you?\n")
    earlier = tok.encode("\n\nJULIET:\nAnd I?\n")
    print(f"3. time to first token, a {len(prefix) + len(question):,}-token prompt whose first "
          f"{prefix_tokens:,} tokens an earlier request left in the cache")
    for name, model in models.items():
        model = stretch(model, "yarn", 8.0)  # 2,048 tokens

        @torch.no_grad()
        def cold():
            return model(torch.tensor([prefix + question]), kv_cache=model.new_kv_cache(1), last_only=True).logits

        def cached():  # a fresh cache each time, holding only the earlier request, so every hit reuses the prefix alone
            cache = PromptCache(model, max_positions=4 * prefix_tokens)
            cache.prefill(torch.tensor([prefix + earlier]))
            start = time.perf_counter()
            hit = cache.prefill(torch.tensor([prefix + question]))
            return time.perf_counter() - start, hit

        cold_seconds, cold_logits = best_seconds(cold, repeats)
        cached_seconds, hit = min((cached() for _ in range(repeats)), key=lambda timed: timed[0])
        assert torch.allclose(hit.logits, cold_logits[0, -1].float(), atol=1e-4), "a cache hit changed the logits"
        print(f"   {name}: cold {cold_seconds * 1e3:.1f} ms, cached ({hit.cached_tokens:,} tokens) "
              f"{cached_seconds * 1e3:.1f} ms: {cached_seconds / cold_seconds:.3f} of it"
              + (" (goal <= 0.1)" if name == "full" else ""))


def constrained_throughput(model: GPT, tok, requests: int, repeats: int) -> None:
    """Tokens per second with a JSON-schema constraint against none, same requests and seeds."""
    token_bytes = tok.decode_tokens_bytes(range(tok.n_vocab))
    constraint = TokenConstraint.from_schema(RECORD_SCHEMA, token_bytes, tok.special_tokens["<|endoftext|>"],
                                             special_ids=tok.special_tokens.values())

    def run(use):
        return sum(len(sampler.complete(model, tok, "JULIET:\n", max_tokens=60, seed=seed, constraint=use)
                       .choices[0].token_ids) for seed in range(requests))

    run(constraint)  # the first visits build the masks; the figure is the steady state
    constrained_seconds, constrained_tokens = best_seconds(lambda: run(constraint), repeats)
    plain_seconds, plain_tokens = best_seconds(lambda: run(None), repeats)
    ratio = (constrained_tokens / constrained_seconds) / (plain_tokens / plain_seconds)
    print(f"4. JSON-schema constrained sampling by mini, {requests} requests ({constraint.cached_states} cached masks)")
    print(f"   constrained {constrained_tokens / constrained_seconds:.0f} tokens/s, unconstrained "
          f"{plain_tokens / plain_seconds:.0f} tokens/s: {ratio:.2f} of it (goal >= 0.8)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoints", type=Path, default=CHECKPOINT_DIR, help="where full, nano-draft, nano, "
                        "mini and mini-edit are")
    parser.add_argument("--k", type=int, default=4, help="draft tokens per round for the draft model")
    parser.add_argument("--min-confidence", type=float, default=0.5, help="also run nano-draft ending a draft "
                        "early after a token it gives less than this probability")
    parser.add_argument("--edit-k", type=int, default=16, help="draft tokens per round for predicted outputs")
    parser.add_argument("--repeats", type=int, default=5, help="each timing is the best of this many runs")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads for every measurement")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"{torch.get_num_threads()} thread(s)")
    models = {name: load_checkpoint(args.checkpoints / f"{name}.pt")[0].eval()
              for name in ("full", "nano-draft", "nano", "mini", "mini-edit")}
    tok = load_tokenizer(models["full"].config.tokenizer)
    prompts = [tok.encode(text) for text in SPECULATIVE_PROMPTS]
    drafts = {"nano-draft": (models["nano-draft"], 0.0),
              f"nano-draft, min_confidence {args.min_confidence}": (models["nano-draft"], args.min_confidence),
              "nano": (models["nano"], 0.0)}
    draft_model_speedup(models["full"], drafts, prompts, 60, args.k, args.repeats)
    predicted_outputs_speedup(models["mini-edit"], tok, 6, 8, args.edit_k, args.repeats)
    cached_time_to_first_token({"full": models["full"], "mini": models["mini"]}, tok, 1000, args.repeats)
    constrained_throughput(models["mini"], tok, 4, args.repeats)


if __name__ == "__main__":
    main()
