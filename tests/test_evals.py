"""Tests for minigpt/evals.py: repeated random sequences, head scores, repeat losses, attention cost,
long-context probe scoring."""

import math
import random
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from minigpt.data import PASSKEY_FILLER, PROBE_KINDS, Probe, make_probe, passkey_probe
from minigpt.evals import (
    HEAD_KINDS,
    answer_accuracy,
    answer_token_accuracy,
    answers_correct,
    attention_cost,
    best_heads,
    effective_length,
    fit_probe,
    head_scores,
    loss_by_position,
    main,
    pattern_scores,
    peak_memory_rise,
    probe_ids,
    repeat_losses,
    repeated_random_tokens,
)
from minigpt.model import GPT, GPTConfig
from minigpt.train import load_tokenizer

MiB = 1024 * 1024


@pytest.fixture(scope="module")
def tiny_gpt():
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=64, context=32, n_layer=2, n_head=4, n_kv_head=2, n_embd=32))


# --- repeated_random_tokens ---------------------------------------------------------------------


def test_repeated_random_tokens_shape_halves_and_range():
    tokens = repeated_random_tokens(5, 7, high=20, low=10, seed=3)
    assert tokens.shape == (5, 14) and tokens.dtype == torch.long
    assert torch.equal(tokens[:, :7], tokens[:, 7:])
    assert tokens.min() >= 10 and tokens.max() < 20
    assert len(tokens[:, :7].unique()) > 1  # random, not a constant


def test_repeated_random_tokens_reach_both_ends_of_the_range():
    tokens = repeated_random_tokens(50, 50, high=4, low=1)
    assert set(tokens.unique().tolist()) == {1, 2, 3}


def test_repeated_random_tokens_are_seeded():
    assert torch.equal(repeated_random_tokens(3, 8, 100, seed=1), repeated_random_tokens(3, 8, 100, seed=1))
    assert not torch.equal(repeated_random_tokens(3, 8, 100, seed=1), repeated_random_tokens(3, 8, 100, seed=2))
    # The global RNG plays no part.
    torch.manual_seed(0)
    first = repeated_random_tokens(2, 8, 100)
    torch.manual_seed(1)
    assert torch.equal(first, repeated_random_tokens(2, 8, 100))


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(n_sequences=0, length=4, high=10),
        dict(n_sequences=1, length=1, high=10),
        dict(n_sequences=1, length=4, high=5, low=5),
        dict(n_sequences=1, length=4, high=5, low=7),
        dict(n_sequences=1, length=4, high=5, low=-1),
    ],
)
def test_repeated_random_tokens_refuses_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        repeated_random_tokens(**kwargs)


# --- pattern_scores on hand-built attention ------------------------------------------------------


def one_hot_pattern(length: int, key_of) -> torch.Tensor:
    """A `(2L, 2L)` attention pattern whose query `t` puts all its weight on key `key_of(t)`."""
    weights = torch.zeros(2 * length, 2 * length)
    for t in range(2 * length):
        key = key_of(t)
        assert 0 <= key <= t  # causal
        weights[t, key] = 1.0
    return weights


L = 6


def previous_token(t):
    return max(t - 1, 0)


def duplicate_token(t):
    return t - L if t >= L else t


def induction(t):
    return t - L + 1 if L <= t < 2 * L - 1 else t


@pytest.mark.parametrize(
    "key_of, kind", [(previous_token, "previous-token"), (duplicate_token, "duplicate-token"), (induction, "induction")]
)
def test_a_perfect_pattern_scores_one_for_its_kind_and_zero_for_the_others(key_of, kind):
    scores = pattern_scores(one_hot_pattern(L, key_of), L)
    assert set(scores) == set(HEAD_KINDS)
    for other, score in scores.items():
        assert score.shape == ()
        assert score.item() == pytest.approx(1.0 if other == kind else 0.0), other


def test_a_uniform_pattern_scores_the_mean_of_one_over_t():
    weights = torch.ones(2 * L, 2 * L).tril()
    weights = weights / weights.sum(-1, keepdim=True)
    scores = pattern_scores(weights, L)
    # Query t (0-based) spreads over t + 1 keys.
    assert scores["previous-token"].item() == pytest.approx(sum(1 / (t + 1) for t in range(1, 2 * L)) / (2 * L - 1))
    assert scores["duplicate-token"].item() == pytest.approx(sum(1 / (t + 1) for t in range(L, 2 * L)) / L)
    assert scores["induction"].item() == pytest.approx(sum(1 / (t + 1) for t in range(L, 2 * L - 1)) / (L - 1))


def test_pattern_scores_keep_the_leading_dimensions():
    patterns = [one_hot_pattern(L, f) for f in (previous_token, duplicate_token, induction)]
    attentions = torch.stack([torch.stack(patterns), torch.stack(patterns[::-1])])  # (2, 3, 2L, 2L)
    scores = pattern_scores(attentions, L)
    for table in scores.values():
        assert table.shape == (2, 3)
    assert torch.equal(scores["previous-token"], torch.tensor([[1.0, 0, 0], [0, 0, 1.0]]))
    assert torch.equal(scores["duplicate-token"], torch.tensor([[0, 1.0, 0], [0, 1.0, 0]]))
    assert torch.equal(scores["induction"], torch.tensor([[0, 0, 1.0], [1.0, 0, 0]]))


# --- head_scores and best_heads on a real model --------------------------------------------------


def test_head_scores_equal_a_direct_computation(tiny_gpt):
    tokens = repeated_random_tokens(3, 8, high=64, seed=5)
    scores = head_scores(tiny_gpt, tokens)
    with torch.no_grad():
        attentions = tiny_gpt.eval()(tokens, return_attention=True).attentions  # per layer (B, n_head, 16, 16)
    length = 8
    expected = {kind: torch.zeros(2, 4) for kind in HEAD_KINDS}
    for layer, weights in enumerate(attentions):
        for head in range(4):
            w = weights[:, head]
            expected["previous-token"][layer, head] = sum(w[:, t, t - 1].mean() for t in range(1, 2 * length)) / (
                2 * length - 1
            )
            expected["duplicate-token"][layer, head] = sum(w[:, length + i, i].mean() for i in range(length)) / length
            expected["induction"][layer, head] = sum(
                w[:, length + i, i + 1].mean() for i in range(length - 1)
            ) / (length - 1)
    assert set(scores) == set(HEAD_KINDS)
    for kind in HEAD_KINDS:
        assert scores[kind].shape == (2, 4)
        assert torch.allclose(scores[kind], expected[kind], atol=1e-6), kind
    # A random model is nowhere near a perfect head.
    assert all(0 < table.max() < 1 for table in scores.values())


def test_head_scores_restore_the_training_flag(tiny_gpt):
    tokens = repeated_random_tokens(1, 4, high=64)
    tiny_gpt.train()
    head_scores(tiny_gpt, tokens)
    assert tiny_gpt.training
    tiny_gpt.eval()
    head_scores(tiny_gpt, tokens)
    assert not tiny_gpt.training


def test_head_scores_refuse_a_sequence_that_does_not_repeat(tiny_gpt):
    tokens = repeated_random_tokens(2, 5, high=64)
    tokens[1, -1] = (tokens[1, -1] + 1) % 64
    with pytest.raises(ValueError, match="second half of each sequence must repeat the first"):
        head_scores(tiny_gpt, tokens)
    with pytest.raises(ValueError, match="expected \\(batch, 2 \\* length\\)"):
        head_scores(tiny_gpt, torch.zeros(2, 7, dtype=torch.long))
    with pytest.raises(ValueError, match="expected \\(batch, 2 \\* length\\)"):
        head_scores(tiny_gpt, torch.zeros(8, dtype=torch.long))


def test_best_heads_picks_the_argmax_layer_and_head():
    scores = {
        "induction": torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.9, 0.2]]),  # (n_layer 2, n_head 3)
        "previous-token": torch.tensor([[0.1, 0.2, 0.8], [0.4, 0.3, 0.2]]),  # index 2: layer 0, head 2
        "duplicate-token": torch.tensor([[0.1, 0.2, 0.3], [0.7, 0.3, 0.2]]),
    }
    best = best_heads(scores)
    assert best["induction"][:2] == (1, 1) and best["induction"][2] == pytest.approx(0.9)
    assert best["previous-token"][:2] == (0, 2) and best["previous-token"][2] == pytest.approx(0.8)
    assert best["duplicate-token"][:2] == (1, 0) and best["duplicate-token"][2] == pytest.approx(0.7)
    assert all(isinstance(x, int) for x in best["induction"][:2])
    assert isinstance(best["induction"][2], float)


# --- repeat_losses --------------------------------------------------------------------------------


def test_repeat_losses_equal_a_direct_cross_entropy(tiny_gpt):
    tokens = repeated_random_tokens(3, 7, high=64, seed=9)  # (3, 14)
    first, second = repeat_losses(tiny_gpt, tokens)
    with torch.no_grad():
        logits = tiny_gpt.eval()(tokens).logits  # position p predicts the token at p + 1
    def mean_loss(targets):
        return torch.stack(
            [F.cross_entropy(logits[b, t - 1], tokens[b, t]) for b in range(3) for t in targets]
        ).mean().item()

    assert first == pytest.approx(mean_loss(range(1, 7)), rel=1e-5)  # targets 1..L-1
    assert second == pytest.approx(mean_loss(range(8, 14)), rel=1e-5)  # targets L+1..2L-1


class CopyingModel(nn.Module):
    """Predicts, at position p >= L - 1, the token at p - L + 1: a perfect in-context copier whose
    guesses are right exactly on the repeat's predictable targets (L+1 .. 2L-1), uniform elsewhere."""

    def __init__(self, vocab_size: int, length: int):
        super().__init__()
        self.vocab_size, self.length = vocab_size, length

    def forward(self, idx):
        batch, time = idx.shape
        logits = torch.zeros(batch, time, self.vocab_size)
        for p in range(self.length, time):
            logits[torch.arange(batch), p, idx[:, p - self.length + 1]] = 30.0

        class Output:
            pass

        output = Output()
        output.logits = logits
        return output


def test_repeat_losses_of_a_perfect_copier_show_the_gap():
    tokens = repeated_random_tokens(4, 10, high=50, seed=2)
    model = CopyingModel(50, 10).train()
    first, second = repeat_losses(model, tokens)
    assert model.training
    assert first == pytest.approx(math.log(50), rel=1e-4)  # uniform guesses on the random first copy
    assert second < 1e-6  # every target of the second copy but its first is predicted


def test_repeat_losses_refuse_a_sequence_that_does_not_repeat(tiny_gpt):
    with pytest.raises(ValueError, match="must repeat the first"):
        repeat_losses(tiny_gpt, torch.arange(8).view(1, 8))


# --- memory and time ------------------------------------------------------------------------------


def test_peak_memory_rise_sees_a_100_mb_allocation():
    peak, seconds = peak_memory_rise(lambda: torch.ones(25_000_000))  # 100 MB of float32, touched
    assert peak >= 90e6
    assert seconds > 0
    nothing, _ = peak_memory_rise(lambda: None)
    assert nothing < 20e6


def test_attention_cost_refuses_an_unknown_kind():
    with pytest.raises(ValueError, match="kind must be one of"):
        attention_cost("flash", 1024)


def test_exact_attention_peaks_far_above_chunked_at_2048_tokens():
    exact = attention_cost("exact", 2048)
    chunked = attention_cost("chunked", 2048)
    for result in (exact, chunked):
        assert set(result) == {"peak_bytes", "seconds"}
        assert result["peak_bytes"] > 0 and result["seconds"] > 0
    # Exact attention builds 4 heads x 2048^2 float32 scores: 64 MiB for one copy of the matrix.
    assert exact["peak_bytes"] >= 64 * MiB
    assert chunked["peak_bytes"] < exact["peak_bytes"] / 4


def test_attention_cost_reports_a_failed_measurement():
    with pytest.raises(RuntimeError, match="measuring chunked attention at 64 tokens failed"):
        attention_cost("chunked", 64, chunk_size=0)


def test_command_line_prints_json(capsys):
    import json

    main(["attention-cost", "exact", "64", "--n-head", "2", "--head-dim", "8"])
    result = json.loads(capsys.readouterr().out)
    assert set(result) == {"peak_bytes", "seconds"} and result["seconds"] > 0


# --- long-context probes --------------------------------------------------------------------------

# The smallest size of each probe kind, and probe sizes that fit a 64-token context with the course
# tokenizer (a variable chain of one hop, no distractor, needs more: 65 tokens).
SMALLEST = {"passkey": 0, "kv": 1, "variable-chain": 0, "frequent-word": 4, "mrcr": 2, "repeat": 2}


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("minigpt-8k")


@pytest.fixture(scope="module")
def random_gpt():
    """A tiny model on the course vocabulary whose weights are large enough that its greedy choices
    depend on the input (at the usual 0.02 init it predicts one token whatever it reads)."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=8192, context=64, n_layer=1, n_head=2, n_kv_head=1, n_embd=16))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 1.0)
    return model.eval()


def short_probes(n: int = 6) -> list[Probe]:
    """Probes of three kinds and several token lengths, all within 64 tokens."""
    makers = [
        lambda rng: passkey_probe(rng, 0),
        lambda rng: make_probe("kv", rng, rng.choice([1, 2])),
        lambda rng: make_probe("frequent-word", rng, rng.randint(4, 12)),
    ]
    return [makers[i % 3](random.Random(i)) for i in range(n)]


class CharTokenizer:
    """One token per byte: lengths are character counts, which makes expected sizes easy to compute."""

    def encode_ordinary(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))


class OracleModel(nn.Module):
    """Knows a list of token sequences: wherever the input so far is a prefix of one of them, it
    puts all its weight on the token that comes next there (token 0 elsewhere), except after the
    prefixes in `wrong_after`, where it picks the next token id instead. Records each call's input
    shape."""

    def __init__(self, sequences: list[list[int]], context: int = 64, wrong_after: tuple = ()):
        super().__init__()
        self.config = SimpleNamespace(context=context)
        self.vocab_size = 8192
        self.next_token = {tuple(seq[:t]): seq[t] for seq in sequences for t in range(1, len(seq))}
        for prefix in wrong_after:
            self.next_token[tuple(prefix)] = (self.next_token[tuple(prefix)] + 1) % self.vocab_size
        self.shapes = []

    def forward(self, idx):
        self.shapes.append(tuple(idx.shape))
        logits = torch.zeros(*idx.shape, self.vocab_size)
        for b, row in enumerate(idx.tolist()):
            for t in range(len(row)):
                logits[b, t, self.next_token.get(tuple(row[: t + 1]), 0)] = 30.0
        return SimpleNamespace(logits=logits)


def full_ids(tokenizer, probe: Probe) -> list[int]:
    prompt, answer = probe_ids(tokenizer, probe)
    return prompt + answer


def test_probes_encode_the_same_in_two_halves_as_whole(tokenizer):
    # The scorer encodes prompt and answer apart; training reads them as one text. They must agree.
    for kind in PROBE_KINDS:
        for seed, extra in enumerate([0, 1, 5, 30]):
            probe = make_probe(kind, random.Random(seed), SMALLEST[kind] + extra)
            prompt, answer = probe_ids(tokenizer, probe)
            assert tokenizer.encode_ordinary(probe.text) == prompt + answer, (kind, extra)
            assert tokenizer.encode_ordinary(probe.text + "\n\n") == prompt + answer + tokenizer.encode_ordinary("\n\n")


def test_probe_ids_refuse_an_empty_answer(tokenizer):
    with pytest.raises(ValueError, match="non-empty prompt and answer"):
        probe_ids(tokenizer, Probe("The pass key is", "", "passkey", 0.5))


def test_fit_probe_matches_a_character_count():
    # With one token per character a passkey probe is a fixed part plus one filler per size unit.
    fixed = len(passkey_probe(random.Random(0), 0, depth=0.5).text)
    for budget in (fixed, fixed + 1, fixed + 3 * len(PASSKEY_FILLER), fixed + 3 * len(PASSKEY_FILLER) - 1, 5000):
        size, probe = fit_probe(lambda n: passkey_probe(random.Random(0), n, depth=0.5), CharTokenizer(), budget)
        assert size == (budget - fixed) // len(PASSKEY_FILLER)
        assert probe == passkey_probe(random.Random(0), size, depth=0.5)


@pytest.mark.parametrize("kind", PROBE_KINDS)
@pytest.mark.parametrize("n_tokens", [200, 700])
def test_fit_probe_finds_the_largest_size_that_fits(tokenizer, kind, n_tokens):
    def make(size):
        calls.append(size)
        return make_probe(kind, random.Random(3), size)

    calls = []
    size, probe = fit_probe(make, tokenizer, n_tokens, smallest=SMALLEST[kind])
    assert probe == make_probe(kind, random.Random(3), size) and size >= SMALLEST[kind]
    assert len(full_ids(tokenizer, probe)) <= n_tokens < len(full_ids(tokenizer, make(size + 1)))
    assert len(calls) <= 2 * math.log2(size + 2) + 3  # doubling then bisecting, not a scan


def test_fit_probe_refuses_what_cannot_fit_or_does_not_grow(tokenizer):
    def passkey(n):
        return passkey_probe(random.Random(0), n)

    with pytest.raises(ValueError, match="even the smallest probe \\(size 0\\) needs more than 20 tokens"):
        fit_probe(passkey, tokenizer, 20)
    with pytest.raises(ValueError, match="length must grow with size"):
        fit_probe(lambda n: passkey(0), tokenizer, 100)
    for bad in (0, -5, 2.5, True):
        with pytest.raises(ValueError, match="n_tokens must be a positive integer"):
            fit_probe(passkey, tokenizer, bad)


def test_a_perfect_model_scores_one_and_a_wrong_digit_scores_zero(tokenizer):
    probes = short_probes(6)
    sequences = [full_ids(tokenizer, probe) for probe in probes]
    assert len({len(seq) for seq in sequences}) > 1  # several lengths in one call
    perfect = OracleModel(sequences)
    assert answers_correct(perfect, tokenizer, probes, batch_size=2) == [True] * 6
    assert answer_accuracy(perfect, tokenizer, probes) == 1.0
    # Probe 3's model gets one digit of its passkey wrong (the third answer token), probe 4's the
    # leading space, each right before and after it: those probes count wrong, and only those.
    wrong_after = []
    for i, offset in ((3, 2), (4, 0)):
        answer_start = len(probe_ids(tokenizer, probes[i])[0])
        wrong_after.append(sequences[i][: answer_start + offset])
    wrong = OracleModel(sequences, wrong_after=wrong_after)
    assert answers_correct(wrong, tokenizer, probes, batch_size=2) == [True, True, True, False, False, True]
    assert answer_accuracy(wrong, tokenizer, probes, batch_size=4) == pytest.approx(4 / 6)
    # A mistake in the prompt, before the answer, does not count.
    in_prompt = OracleModel(sequences, wrong_after=[sequences[0][:5]])
    assert answers_correct(in_prompt, tokenizer, probes) == [True] * 6


def test_answer_token_accuracy_finds_the_answer_token_that_goes_wrong(tokenizer):
    # Four-digit answers, each " " then four digits, from probes of two kinds and several lengths.
    probes = [passkey_probe(random.Random(0), 0), passkey_probe(random.Random(1), 0),
              make_probe("kv", random.Random(2), 1), make_probe("kv", random.Random(3), 2)]
    sequences = [full_ids(tokenizer, probe) for probe in probes]
    assert {len(probe_ids(tokenizer, probe)[1]) for probe in probes} == {5}
    assert answer_token_accuracy(OracleModel(sequences, context=128), tokenizer, probes) == [1.0] * 5
    # Probe 0's model misses the first digit and probe 1's the third; with the true answer fed in,
    # each goes on right after its miss.
    wrong_after = [sequences[i][: len(probe_ids(tokenizer, probes[i])[0]) + offset] for i, offset in ((0, 1), (1, 3))]
    wrong = OracleModel(sequences, context=128, wrong_after=wrong_after)
    assert answer_token_accuracy(wrong, tokenizer, probes, batch_size=3) == [1.0, 0.75, 1.0, 0.75, 1.0]
    assert answer_accuracy(wrong, tokenizer, probes) == 0.5


def test_answer_token_accuracy_refuses_answers_of_different_token_lengths(tokenizer):
    probes = [passkey_probe(random.Random(0), 2, digits=4), passkey_probe(random.Random(0), 2, digits=6)]
    model = OracleModel([full_ids(tokenizer, probe) for probe in probes], context=256)
    with pytest.raises(ValueError, match="same number of tokens to be scored by position, got \\[5, 7\\]"):
        answer_token_accuracy(model, tokenizer, probes)


def test_the_first_and_last_answer_tokens_matter(tokenizer):
    probe = passkey_probe(random.Random(5), 0)
    sequence = full_ids(tokenizer, probe)
    answer_start = len(probe_ids(tokenizer, probe)[0])
    assert answers_correct(OracleModel([sequence]), tokenizer, [probe]) == [True]
    for position in (answer_start, len(sequence) - 1):
        model = OracleModel([sequence], wrong_after=[sequence[:position]])
        assert answers_correct(model, tokenizer, [probe]) == [False], position


def test_a_probe_may_fill_the_context_exactly(tokenizer):
    probe = passkey_probe(random.Random(5), 0)
    sequence = full_ids(tokenizer, probe)
    assert answers_correct(OracleModel([sequence], context=len(sequence)), tokenizer, [probe]) == [True]
    with pytest.raises(ValueError, match=f"needs {len(sequence)} tokens, more than the model's context"):
        answers_correct(OracleModel([sequence], context=len(sequence) - 1), tokenizer, [probe])


def test_one_forward_per_batch_of_equal_lengths(tokenizer):
    probes = short_probes(9)
    lengths = [len(full_ids(tokenizer, probe)) for probe in probes]
    model = OracleModel([full_ids(tokenizer, probe) for probe in probes])
    answers_correct(model, tokenizer, probes, batch_size=2)
    expected = sorted((-(-lengths.count(n) // 2), n) for n in set(lengths))
    calls = sorted((len([s for s in model.shapes if s[1] == n - 1]), n) for n in set(lengths))
    assert calls == expected
    assert all(batch <= 2 for batch, _ in model.shapes) and sum(b for b, _ in model.shapes) == 9


def test_answers_correct_agrees_with_greedy_generation(tokenizer, random_gpt):
    probes = short_probes(6)
    # Add probes whose answer is the model's own greedy continuation, and ones that share only its
    # first token, so both outcomes are tested.
    for probe in short_probes(6):
        prompt, _ = probe_ids(tokenizer, probe)
        generated = random_gpt.generate(torch.tensor([prompt]), 3)[0, len(prompt) :].tolist()
        for answer_ids in (generated, generated[:2] + [(generated[2] + 1) % 8192]):
            answer = tokenizer.decode(answer_ids)
            if tokenizer.encode_ordinary(answer) == answer_ids:  # keep answers that re-encode exactly
                probes.append(Probe(probe.prompt, answer, probe.kind, probe.depth))
    assert len(probes) >= 12
    expected = []
    for probe in probes:
        prompt, answer = probe_ids(tokenizer, probe)
        generated = random_gpt.generate(torch.tensor([prompt]), len(answer), temperature=0.0)
        expected.append(generated[0, len(prompt) :].tolist() == answer)
    assert 3 <= sum(expected) <= len(probes) - 3
    assert answers_correct(random_gpt, tokenizer, probes) == expected
    assert answers_correct(random_gpt, tokenizer, probes, batch_size=1) == expected
    assert answer_accuracy(random_gpt, tokenizer, probes, batch_size=3) == pytest.approx(sum(expected) / len(probes))


def test_answers_correct_refuses_probes_beyond_the_context(tokenizer, random_gpt):
    long = passkey_probe(random.Random(0), 3)
    with pytest.raises(ValueError, match=r"probe 1 \(passkey\) needs \d+ tokens, more than the model's context of 64"):
        answers_correct(random_gpt, tokenizer, [passkey_probe(random.Random(0), 0), long])
    with pytest.raises(ValueError, match="no probes"):
        answer_accuracy(random_gpt, tokenizer, [])
    with pytest.raises(ValueError, match="batch_size"):
        answers_correct(random_gpt, tokenizer, short_probes(1), batch_size=0)


def test_answers_correct_restores_the_training_flag(tokenizer, random_gpt):
    random_gpt.train()
    answers_correct(random_gpt, tokenizer, short_probes(2))
    assert random_gpt.training
    random_gpt.eval()
    answers_correct(random_gpt, tokenizer, short_probes(2))
    assert not random_gpt.training


def test_loss_by_position_equals_a_direct_cross_entropy(tiny_gpt):
    tokens = torch.randint(0, 64, (5, 20), generator=torch.Generator().manual_seed(4))
    losses = loss_by_position(tiny_gpt, tokens, batch_size=2)
    assert losses.shape == (19,)
    with torch.no_grad():
        logits = tiny_gpt.eval()(tokens[:, :-1]).logits
    expected = torch.stack(
        [torch.stack([F.cross_entropy(logits[b, t], tokens[b, t + 1]) for b in range(5)]).mean() for t in range(19)]
    )
    assert torch.allclose(losses, expected, atol=1e-5)
    assert torch.allclose(loss_by_position(tiny_gpt, tokens, batch_size=8), expected, atol=1e-5)


def test_loss_by_position_of_a_copier_drops_in_the_repeat():
    tokens = repeated_random_tokens(3, 10, high=50, seed=1)  # (3, 20)
    model = CopyingModel(50, 10).train()
    model.config = SimpleNamespace(context=32)
    losses = loss_by_position(model, tokens)
    assert model.training
    # Positions 0..9 predict tokens of the random first copy and the repeat's first token: chance.
    assert torch.allclose(losses[:10], torch.full((10,), math.log(50)), rtol=1e-4)
    assert losses[10:].max() < 1e-6  # positions 10..18 predict the rest of the repeat


def test_loss_by_position_refuses_bad_tokens(tiny_gpt):
    for bad in (torch.zeros(8, dtype=torch.long), torch.zeros(2, 1, dtype=torch.long)):
        with pytest.raises(ValueError, match="time >= 2"):
            loss_by_position(tiny_gpt, bad)
    assert loss_by_position(tiny_gpt, torch.zeros(1, 33, dtype=torch.long)).shape == (32,)  # 32 inputs fit
    with pytest.raises(ValueError, match="34 tokens need 33 inputs, more than the model's context of 32"):
        loss_by_position(tiny_gpt, torch.zeros(1, 34, dtype=torch.long))


LENGTHS = [256, 512, 1024, 2048, 4096]


@pytest.mark.parametrize(
    "scores, margin, expected",
    [
        ([1.0, 0.98, 0.96, 0.80, 0.97], 0.05, 1024),  # 2048 falls too far; the recovery at 4096 does not count
        ([1.0, 0.95, 0.90, 0.85, 0.80], 0.05, 512),  # exactly the margin is within it
        ([1.0, 0.95, 0.90, 0.85, 0.80], 0.0, 256),
        ([0.5, 0.9, 0.95, 0.47, 0.4], 0.05, 2048),  # a better score than the first is within the margin
        ([0.9, 0.9, 0.9, 0.9, 0.9], 0.0, 4096),
        ([1.0, 0.0, 1.0, 1.0, 1.0], 0.5, 256),
    ],
)
def test_effective_length_on_hand_made_tables(scores, margin, expected):
    assert effective_length(LENGTHS, scores, margin) == expected


def test_effective_length_for_losses_counts_a_rise():
    losses = [3.0, 3.05, 3.1, 3.4, 2.0]
    assert effective_length(LENGTHS, losses, 0.1, higher_is_better=False) == 1024
    assert effective_length(LENGTHS, losses, 0.1) == 2048  # read as accuracies, only the last one fell
    assert effective_length([128], [0.3], 0.0) == 128


def test_effective_length_against_a_reference_score():
    scores = [0.96, 0.97, 0.9, 0.2, 0.1]  # a stretched model's accuracies
    assert effective_length(LENGTHS, scores, 0.05, reference=1.0) == 512
    assert effective_length(LENGTHS, [0.0] * 5, 0.05, reference=1.0) == 0  # fails already at the training length
    assert effective_length(LENGTHS, [0.0] * 5, 0.05) == 4096  # without a reference, 0 stays "within" 0
    assert effective_length(LENGTHS, [0.0] * 5, 0.05, reference=0.0) == 0  # the model itself fails: nothing to keep
    assert effective_length(LENGTHS, [0.0] * 5, 0.05, higher_is_better=False, reference=0.0) == 4096  # a loss of 0 is kept
    with pytest.raises(ValueError, match="reference must be a finite number"):
        effective_length(LENGTHS, scores, 0.05, reference=math.nan)


@pytest.mark.parametrize(
    "lengths, scores, margin, match",
    [
        ([], [], 0.1, "one score per length"),
        ([1, 2], [0.5], 0.1, "one score per length"),
        ([2, 1], [0.5, 0.5], 0.1, "rise strictly"),
        ([1, 1], [0.5, 0.5], 0.1, "rise strictly"),
        ([1, 2], [0.5, math.nan], 0.1, "finite"),
        ([1, 2], [0.5, 0.5], -0.1, "margin"),
        ([1, 2], [0.5, 0.5], math.nan, "margin"),
    ],
)
def test_effective_length_refuses_bad_tables(lengths, scores, margin, match):
    with pytest.raises(ValueError, match=match):
        effective_length(lengths, scores, margin)
