"""Tests for minigpt/evals.py: repeated random sequences, head scores, repeat losses, attention cost."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from minigpt.evals import (
    HEAD_KINDS,
    attention_cost,
    best_heads,
    head_scores,
    main,
    pattern_scores,
    peak_memory_rise,
    repeat_losses,
    repeated_random_tokens,
)
from minigpt.model import GPT, GPTConfig

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
