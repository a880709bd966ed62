"""Tests for minigpt/speculative.py: greedy speculative decoding gives the target's own greedy tokens
with every drafter; sampled speculative decoding gives the target's distribution (a chi-square test
against the exact distribution, with its false-failure rate stated and its power shown); the
drafters' proposals and `_continuation` on hand-made lists; `ModelDrafter`'s `min_confidence` (a
round's draft ends after a token the draft itself found unlikely, with greedy output and sampled
distribution unchanged); the Leviathan et al. formulas and the acceptance accounting by hand; and
clear errors on bad inputs.

Tiny random models throughout, re-drawn at a scale where the next token depends on the context
(the default init gives nearly uniform, self-repeating outputs).
"""

import collections
import itertools

import pytest
import torch
from scipy.stats import chi2

from minigpt.model import GPT, GPTConfig
from minigpt.sampler import SamplingParams, next_token_probabilities
from minigpt.speculative import (
    Draft,
    ModelDrafter,
    PredictionDrafter,
    PromptLookupDrafter,
    Round,
    SpeculativeResult,
    _continuation,
    agreement,
    distill_draft,
    expected_tokens_per_pass,
    predicted_speedup,
    speculative_generate,
    target_choices,
)

PROMPT = [3, 14, 15, 9, 2, 6]


@torch.no_grad()
def tiny_model(seed: int, vocab: int = 50, n_layer: int = 2, **overrides) -> GPT:
    """A random GPT with untied output layer and every matrix at std 1 / sqrt(fan_in): logits of std about 1."""
    torch.manual_seed(seed)
    fields = dict(vocab_size=vocab, context=64, n_layer=n_layer, n_head=2, n_kv_head=1, n_embd=32,
                  tie_embeddings=False)
    model = GPT(GPTConfig(**{**fields, **overrides})).eval()
    for p in model.parameters():
        if p.ndim == 2:
            p.normal_(0, 1 / p.shape[1] ** 0.5)
    model.token_embedding.weight.normal_(0, 1.0)
    return model


@torch.no_grad()
def noisy_copy(model: GPT, seed: int, noise: float) -> GPT:
    """The same model with every weight nudged: a draft that agrees with the target often, not always."""
    copy = GPT(model.config).eval()
    copy.load_state_dict(model.state_dict())
    generator = torch.Generator().manual_seed(seed)
    for p in copy.parameters():
        p.add_(torch.randn(p.shape, generator=generator) * noise * p.std())
    return copy


def greedy_generate(model: GPT, prompt: list[int], n: int, use_cache: bool = True) -> list[int]:
    return model.generate(torch.tensor([prompt]), n, temperature=0.0, use_cache=use_cache)[0, len(prompt):].tolist()


@pytest.fixture(scope="module")
def target() -> GPT:
    return tiny_model(0)


# ---------------------------------------------------------------------------------------------
# Greedy: the target's tokens, exactly


@pytest.mark.parametrize("k", [1, 3, 5])
@pytest.mark.parametrize("draft_kind", ["unrelated", "noisy copy"])
def test_greedy_speculative_decoding_with_a_draft_model_gives_the_targets_greedy_tokens(target, k, draft_kind):
    draft = tiny_model(1, n_layer=1) if draft_kind == "unrelated" else noisy_copy(target, 1, noise=0.3)
    want = greedy_generate(target, PROMPT, 30)
    result = speculative_generate(target, ModelDrafter(draft), PROMPT, 30, k=k)
    assert result.tokens == want
    assert result.finish_reason == "length"
    assert result.drafted > result.accepted  # some drafts were rejected...
    if draft_kind == "noisy copy":
        assert result.accepted > 0  # ...and with a close draft some were kept
        assert result.target_passes < 30


@pytest.mark.parametrize("min_confidence", [0.1, 0.3, 0.6, 1.0])
@pytest.mark.parametrize("draft_kind", ["unrelated", "noisy copy"])
def test_greedy_speculative_decoding_with_a_confidence_threshold_gives_the_targets_greedy_tokens(
        target, draft_kind, min_confidence):
    draft = tiny_model(1, n_layer=1) if draft_kind == "unrelated" else noisy_copy(target, 1, noise=0.3)
    want = greedy_generate(target, PROMPT, 30)
    result = speculative_generate(target, ModelDrafter(draft, min_confidence=min_confidence), PROMPT, 30, k=4)
    assert result.tokens == want
    lengths = [len(r.drafted) for r in result.rounds]
    assert max(lengths) <= 4
    if min_confidence >= 0.3:  # these tiny drafts (vocabulary 50) are never that sure: one token a round
        assert max(lengths) <= 1
    else:  # the threshold lets some rounds run to k and stops others early (the last few rounds ask for fewer)
        assert 4 in lengths and any(0 < n < 4 for n in lengths[:-4])


def test_greedy_prompt_lookup_decoding_gives_the_targets_greedy_tokens(target):
    prompt = [7, 8, 9, 10, 7, 8, 9, 10, 7, 8]  # a repetitive prompt: lookups find something to copy
    want = greedy_generate(target, prompt, 40)
    result = speculative_generate(target, PromptLookupDrafter(max_ngram=3), prompt, 40, k=4)
    assert result.tokens == want
    assert result.drafted > 0 and result.accepted > 0  # the target's own output repeats, so copies get kept
    assert result.target_passes < 40


def test_a_prediction_equal_to_the_targets_output_is_accepted_in_full(target):
    want = greedy_generate(target, PROMPT, 20)
    result = speculative_generate(target, PredictionDrafter(want, len(PROMPT)), PROMPT, 20, k=4)
    assert result.tokens == want
    assert result.acceptance_rate == 1.0
    # 20 tokens in rounds of 4 drafts + the target's own token: 4 passes, k + 1 = 5 tokens per pass
    assert result.target_passes == 4
    assert result.tokens_per_pass == 5.0
    assert [r.accepted for r in result.rounds] == [4, 4, 4, 4]


def test_a_wrong_prediction_still_gives_the_targets_tokens_and_realigns_after_a_miss(target):
    want = greedy_generate(target, PROMPT, 24)
    prediction = list(want)
    prediction[5] = (want[5] + 1) % 50  # two wrong tokens: the rest of the prediction is still right
    prediction[14] = (want[14] + 1) % 50
    result = speculative_generate(target, PredictionDrafter(prediction, len(PROMPT)), PROMPT, 24, k=4)
    assert result.tokens == want
    assert 0 < result.acceptance_rate < 1
    assert result.accepted >= 24 - 2 * 5  # realigned after each miss, the drafts are kept again
    unrelated = speculative_generate(target, PredictionDrafter([1, 2, 3] * 10, len(PROMPT)), PROMPT, 24, k=4)
    assert unrelated.tokens == want


def test_an_end_token_stops_speculative_decoding_before_it(target):
    want = greedy_generate(target, PROMPT, 20)
    end = want[6]
    first = want.index(end)
    result = speculative_generate(target, PredictionDrafter(want, len(PROMPT)), PROMPT, 20, k=4, end_token=end)
    assert result.tokens == want[:first]
    assert result.finish_reason == "stop"


@pytest.fixture(scope="module")
def ntk_target() -> GPT:
    return tiny_model(0, context=32, rope_scaling="dynamic-ntk", rope_factor=4.0, rope_original_context=8)


def test_plain_decoding_past_the_dynamic_ntk_context_is_exact_with_the_cache(ntk_target):
    # the reference for the next test: the sampler's recompute gives generate(use_cache=False)'s tokens
    assert greedy_generate(ntk_target, PROMPT, 24) == greedy_generate(ntk_target, PROMPT, 24, use_cache=False)


def test_greedy_speculative_decoding_past_the_dynamic_ntk_context_gives_the_targets_greedy_tokens(ntk_target):
    want = greedy_generate(ntk_target, PROMPT, 24, use_cache=False)
    result = speculative_generate(ntk_target, PredictionDrafter(want, len(PROMPT)), PROMPT, 24, k=4)
    assert result.tokens == want


# ---------------------------------------------------------------------------------------------
# Sampling: the target's distribution, exactly

VOCAB = 5
PLAIN = SamplingParams(temperature=1.0)
TRUNCATED = SamplingParams(temperature=0.9, top_k=4, top_p=0.85, presence_penalty=0.7, frequency_penalty=0.4)
ALPHA = 1e-4  # the chance that a correct sampler fails one of these tests (for a given set of seeds)
RUNS = 1000  # about 5 ms a run on a busy CPU: a few seconds a test


@pytest.fixture(scope="module")
def small_target() -> GPT:
    return tiny_model(0, vocab=VOCAB, n_layer=1, context=16)


@pytest.fixture(scope="module")
def small_draft() -> GPT:
    return tiny_model(1, vocab=VOCAB, n_layer=1, context=16)  # deliberately another model


@torch.no_grad()
def exact_first_two(model: GPT, prompt: list[int], params: SamplingParams) -> torch.Tensor:
    """P(x1, x2) = p(x1) * p(x2 | x1) from the model's processed distributions, by enumeration: (V, V)."""
    def distribution(sequence, counts):
        logits = model(torch.tensor([sequence])).logits[0, -1].float()
        return next_token_probabilities(logits, params, counts).double()

    first = distribution(prompt, torch.zeros(VOCAB))
    rows = []
    for x1 in range(VOCAB):
        counts = torch.zeros(VOCAB)
        counts[x1] = 1
        rows.append(first[x1] * distribution(prompt + [x1], counts))
    return torch.stack(rows)


def chi_square(observed: collections.Counter, expected: torch.Tensor, runs: int) -> tuple[float, float]:
    """Pearson's statistic of `observed` outcome counts against the probabilities `expected` (V, V), and
    the critical value at false-failure rate ALPHA. Cells expected fewer than 5 times are pooled, and an
    outcome of probability 0 fails outright (statistic infinity)."""
    probabilities = {cell: float(expected[cell]) for cell in itertools.product(range(VOCAB), repeat=2)}
    if any(probabilities[cell] < 1e-12 for cell in observed):
        return float("inf"), 0.0
    cells = sorted((p * runs, observed[cell]) for cell, p in probabilities.items() if p >= 1e-12)
    rare = [cell for cell in cells if cell[0] < 5]
    cells = [cell for cell in cells if cell[0] >= 5]
    if rare:
        pooled = (sum(e for e, _ in rare), sum(o for _, o in rare))
        if pooled[0] < 5 and cells:  # still rare: merge with the least likely common cell
            e, o = cells.pop(0)
            pooled = (pooled[0] + e, pooled[1] + o)
        cells.append(pooled)
    statistic = sum((o - e) ** 2 / e for e, o in cells)
    return statistic, float(chi2.ppf(1 - ALPHA, len(cells) - 1))


def speculative_first_two(target: GPT, make_drafter, params: SamplingParams, max_tokens: int) -> collections.Counter:
    """How often each first two tokens came out of RUNS seeded runs from the prompt [0, 1] (k = 2)."""
    counts = collections.Counter()
    for seed in range(RUNS):
        tokens = speculative_generate(target, make_drafter(), [0, 1], max_tokens, k=2, params=params, seed=seed).tokens
        counts[tuple(tokens[:2])] += 1
    return counts


def sample_exactly(joint: torch.Tensor, seed: int) -> collections.Counter:
    draws = torch.multinomial(joint.flatten().float(), RUNS, replacement=True, generator=torch.Generator().manual_seed(seed))
    return collections.Counter(divmod(int(i), VOCAB) for i in draws)


# max_tokens 3 with k = 2: the first two tokens are two judged drafts, or a draft and a residual draw;
# max_tokens 2: one draft, then the target's bonus token after it (with the penalties counting it).
@pytest.mark.parametrize("params, max_tokens", [(PLAIN, 3), (TRUNCATED, 2)], ids=["plain", "truncated"])
def test_speculative_sampling_with_a_draft_model_has_the_targets_distribution(small_target, small_draft, params,
                                                                              max_tokens):
    target_joint = exact_first_two(small_target, [0, 1], params)
    draft_joint = exact_first_two(small_draft, [0, 1], params)
    observed = speculative_first_two(small_target, lambda: ModelDrafter(small_draft), params, max_tokens)
    statistic, critical = chi_square(observed, target_joint, RUNS)
    assert statistic < critical, (statistic, critical)
    # power: the same test on the same number of draws from the draft alone rejects it, and so it does
    # a sampler that is wrong one time in ten (drawing from the draft instead of the target)
    statistic, critical = chi_square(sample_exactly(draft_joint, seed=1), target_joint, RUNS)
    assert statistic > critical, (statistic, critical)
    statistic, critical = chi_square(sample_exactly(0.9 * target_joint + 0.1 * draft_joint, seed=2), target_joint, RUNS)
    assert statistic > critical, (statistic, critical)
    # and exact draws from the target pass it (the test is not merely strict)
    statistic, critical = chi_square(sample_exactly(target_joint, seed=3), target_joint, RUNS)
    assert statistic < critical, (statistic, critical)


def test_speculative_sampling_with_a_confidence_threshold_has_the_targets_distribution(small_target, small_draft):
    target_joint = exact_first_two(small_target, [0, 1], PLAIN)
    observed = speculative_first_two(small_target, lambda: ModelDrafter(small_draft, min_confidence=0.5), PLAIN, 3)
    statistic, critical = chi_square(observed, target_joint, RUNS)
    assert statistic < critical, (statistic, critical)


def rounds_cut_short(result: SpeculativeResult, max_tokens: int, k: int) -> tuple[int, int]:
    """Rounds whose draft stopped before the k (or fewer, near the end) tokens asked for, and rounds that did not."""
    short = full = emitted = 0
    for r in result.rounds:
        asked = min(k, max_tokens - emitted - 1)
        if len(r.drafted) < asked:
            short += 1
        elif asked:
            full += 1
        emitted += r.accepted + 1
    return short, full


@pytest.mark.parametrize("min_confidence", [0.0, 0.5])
def test_a_confidence_threshold_really_ends_some_sampled_rounds_early(small_target, small_draft, min_confidence):
    # so the distribution test above covers drafts of every length, not only of k
    short = full = 0
    for seed in range(10):
        result = speculative_generate(small_target, ModelDrafter(small_draft, min_confidence=min_confidence), [0, 1],
                                      10, k=3, params=PLAIN, seed=seed)
        counted = rounds_cut_short(result, 10, 3)
        short, full = short + counted[0], full + counted[1]
    if min_confidence == 0:
        assert short == 0 and full > 0
    else:
        assert short > 0 and full > 0


@pytest.mark.parametrize("params, max_tokens", [(PLAIN, 3), (TRUNCATED, 2)], ids=["plain", "truncated"])
def test_speculative_sampling_with_a_fixed_prediction_has_the_targets_distribution(small_target, params, max_tokens):
    target_joint = exact_first_two(small_target, [0, 1], params)
    # a point-mass draft, kept with probability p(guess): guess the likeliest pair, then token 0
    guess = [*divmod(int(target_joint.argmax()), VOCAB), 0]
    observed = speculative_first_two(small_target, lambda: PredictionDrafter(guess, 2), params, max_tokens)
    assert 0.05 < observed[tuple(guess[:2])] / RUNS < 0.95  # the guess is sometimes kept, sometimes not
    statistic, critical = chi_square(observed, target_joint, RUNS)
    assert statistic < critical, (statistic, critical)


def test_truncation_leaves_some_first_two_tokens_impossible(small_target):
    # so the truncated case above also checks that speculative decoding never emits a token top-k/top-p removed
    assert (exact_first_two(small_target, [0, 1], TRUNCATED) == 0).sum() >= VOCAB


def test_the_chi_square_helper_pools_rare_cells_and_fails_impossible_outcomes():
    expected = torch.zeros(VOCAB, VOCAB, dtype=torch.float64)
    expected[0, 0], expected[0, 1], expected[1, 0], expected[1, 1] = 0.5, 0.4995, 0.0004, 0.0001
    observed = collections.Counter({(0, 0): RUNS // 2, (0, 1): RUNS // 2})
    statistic, critical = chi_square(observed, expected, RUNS)
    assert critical == pytest.approx(chi2.ppf(1 - ALPHA, 1))  # the two rare cells pooled with the next: 2 cells
    assert statistic < critical
    assert chi_square(collections.Counter({(3, 3): 1}), expected, RUNS)[0] == float("inf")


# ---------------------------------------------------------------------------------------------
# Drafters and _continuation, by hand


def test_continuation_finds_the_latest_occurrence_of_the_longest_matching_tail():
    source = [5, 6, 7, 5, 6, 8]
    assert _continuation(source, [1, 5, 6], 3) == 5  # [1, 5, 6] absent; [5, 6] last ends at 5, followed by 8
    assert _continuation(source, [6, 7, 5], 3) == 4  # the whole tail [6, 7, 5] ends at 4, followed by 6
    assert _continuation(source, [6, 8], 3) is None  # [6, 8] and [8] end the source: nothing follows them
    assert _continuation(source, [9], 3) is None
    assert _continuation(source, [], 3) is None


def test_continuation_prefers_a_longer_match_to_a_later_one():
    source = [1, 2, 9, 3, 2, 7]
    assert _continuation(source, [1, 2], 2) == 2  # [1, 2] matches at 0..2: propose 9
    assert _continuation(source, [1, 2], 1) == 5  # only the last token: [2] last ends at 5, propose 7


def test_prompt_lookup_drafter_copies_what_followed_the_tail_earlier():
    drafter, params, counts = PromptLookupDrafter(max_ngram=3), SamplingParams(temperature=0), torch.zeros(50)
    # tail [4, 1, 2] is new; [1, 2] appeared at the start, followed by 3, 4, 1
    assert drafter.propose([1, 2, 3, 4, 1, 2], 3, params, counts, None) == Draft([3, 4, 1], None)
    assert drafter.propose([1, 2, 3, 4, 1, 2], 9, params, counts, None) == Draft([3, 4, 1, 2], None)
    assert drafter.propose([1, 2, 3], 3, params, counts, None) == Draft([], None)
    # A match may overlap the tail: in a run of one token, the run itself predicts more of it.
    assert drafter.propose([5, 5], 3, params, counts, None) == Draft([5], None)
    assert drafter.propose([7, 5, 5, 5], 3, params, counts, None) == Draft([5], None)


def test_prediction_drafter_proposes_the_next_predicted_tokens_and_realigns():
    drafter, params, counts = PredictionDrafter([10, 11, 12, 13, 14], prompt_length=2), SamplingParams(), None
    assert drafter.propose([0, 1], 3, params, counts, None).tokens == [10, 11, 12]
    assert drafter.propose([0, 1, 10, 11], 3, params, counts, None).tokens == [12, 13, 14]
    assert drafter.propose([0, 1, 10, 11, 12, 13, 14], 3, params, counts, None).tokens == []  # prediction used up
    assert drafter.propose([0, 1, 10, 99], 3, params, counts, None) == Draft([], None)  # 99 is nowhere
    assert drafter.propose([0, 1, 10, 99, 12], 3, params, counts, None).tokens == [13, 14]  # found 12 again


def test_model_drafter_proposes_its_own_greedy_tokens_with_one_hot_probabilities(target):
    draft = tiny_model(1, n_layer=1)
    proposal = ModelDrafter(draft).propose(list(PROMPT), 4, SamplingParams(temperature=0), torch.zeros(50), None)
    assert proposal.tokens == greedy_generate(draft, PROMPT, 4)
    assert proposal.probabilities.shape == (4, 50)
    assert proposal.probabilities.sum(dim=-1).tolist() == [1.0] * 4
    assert proposal.probabilities.argmax(dim=-1).tolist() == proposal.tokens


@torch.no_grad()
def greedy_confidences(draft: GPT, sequence: list[int], k: int, counts: torch.Tensor, presence: float = 0.0,
                       frequency: float = 0.0) -> tuple[list[int], list[float]]:
    """The draft's k greedy tokens after `sequence` (penalised by `counts` of earlier tokens) and the
    probability it gave each: the softmax at temperature 1 of its penalised logits, each from a full pass."""
    tokens, confidences, counts = [], [], counts.clone()
    for _ in range(k):
        logits = draft(torch.tensor([sequence + tokens])).logits[0, -1].float()
        logits = logits - frequency * counts - presence * (counts > 0).float()
        token = int(logits.argmax())
        tokens.append(token), confidences.append(float(logits.softmax(dim=-1)[token]))
        counts[token] += 1
    return tokens, confidences


@pytest.mark.parametrize("presence, frequency", [(0.0, 0.0), (0.8, 0.5)], ids=["plain", "penalised"])
def test_model_drafter_stops_right_after_the_first_token_below_min_confidence(target, presence, frequency):
    draft = tiny_model(1, n_layer=1)
    params = SamplingParams(temperature=0, presence_penalty=presence, frequency_penalty=frequency)
    continuation = greedy_generate(target, PROMPT, 12)
    lengths = collections.Counter()
    for cut in range(0, 12, 2):  # several contexts: the prompt and the target's continuation so far
        sequence = PROMPT + continuation[:cut]
        counts = torch.bincount(torch.tensor(continuation[:cut], dtype=torch.long), minlength=50).float()
        tokens, confidences = greedy_confidences(draft, sequence, 4, counts, presence, frequency)
        for min_confidence in (0.0, 0.07, 0.1, 0.13, 0.2, 1.0):
            assert all(abs(c - min_confidence) > 1e-4 for c in confidences)  # no knife edge for float rounding
            below = [i for i, c in enumerate(confidences) if c < min_confidence]
            want = below[0] + 1 if below else 4
            proposal = ModelDrafter(draft, min_confidence=min_confidence).propose(sequence, 4, params, counts, None)
            assert proposal.tokens == tokens[:want], (cut, min_confidence, confidences)
            assert proposal.probabilities.shape == (want, 50)
            lengths[want] += 1
            if min_confidence == 1.0:
                assert want == 1  # every round drafts one token
            if min_confidence == 0.0:
                assert want == 4  # no threshold: k tokens
    assert lengths[1] and lengths[4] and lengths[2] + lengths[3]  # every kind of stop happened


def test_sampled_model_drafter_stops_after_the_first_token_it_drew_with_probability_below_min_confidence(target):
    draft, min_confidence = tiny_model(1, n_layer=1), 0.015  # sampling 50 tokens: most draws have a few percent
    lengths = collections.Counter()
    for seed in range(20):
        generator = torch.Generator().manual_seed(seed)
        proposal = ModelDrafter(draft, min_confidence=min_confidence).propose(list(PROMPT), 4, PLAIN,
                                                                              torch.zeros(50), generator)
        with torch.no_grad():  # each row is the draft's softmax after the tokens drawn before it
            for i, row in enumerate(proposal.probabilities):
                logits = draft(torch.tensor([PROMPT + proposal.tokens[:i]])).logits[0, -1]
                torch.testing.assert_close(row, logits.softmax(dim=-1), rtol=0, atol=1e-5)
        drawn = [float(row[token]) for row, token in zip(proposal.probabilities, proposal.tokens)]
        assert all(p >= min_confidence for p in drawn[:-1])  # kept going after each of these...
        assert len(drawn) == 4 or drawn[-1] < min_confidence  # ...and stopped only after an unlikely one
        lengths[len(drawn)] += 1
    assert lengths[4] and sum(lengths[n] for n in (1, 2, 3))


@pytest.mark.parametrize("min_confidence", [-0.1, 1.5, float("nan")])
def test_min_confidence_outside_zero_to_one_is_refused(target, min_confidence):
    with pytest.raises(ValueError, match=r"min_confidence must be a probability in \[0, 1\]"):
        ModelDrafter(target, min_confidence=min_confidence)


# ---------------------------------------------------------------------------------------------
# Formulas and accounting, by hand


def test_expected_tokens_per_pass_by_hand():
    assert expected_tokens_per_pass(0.0, 4) == 1.0  # every draft rejected: only the target's own token
    assert expected_tokens_per_pass(1.0, 4) == 5.0  # every draft kept: k + 1
    assert expected_tokens_per_pass(0.5, 2) == pytest.approx(1.75)  # (1 - 0.5 ** 3) / 0.5 = 1 + 0.5 + 0.25
    assert expected_tokens_per_pass(0.8, 4) == pytest.approx(3.3616)  # (1 - 0.32768) / 0.2


def test_predicted_speedup_by_hand():
    assert predicted_speedup(0.5, 2, 0.1) == pytest.approx(1.75 / 1.2)  # round cost 2 * 0.1 + 1
    assert predicted_speedup(0.8, 4, 0.05) == pytest.approx(3.3616 / 1.2)
    assert predicted_speedup(0.0, 4, 0.1) == pytest.approx(1 / 1.4)  # a useless draft only costs
    assert predicted_speedup(1.0, 3, 0.0) == 4.0  # free perfect drafts
    assert predicted_speedup(0.5, 2, 0.1, verify_cost=1.5) == pytest.approx(1.75 / 1.7)  # 2 * 0.1 + 1.5


def test_acceptance_accounting_on_a_hand_built_result():
    result = SpeculativeResult(
        tokens=[1, 2, 3, 9, 4, 7, 8],
        rounds=[
            Round([1, 2, 3], 3, 9),  # all three kept, plus the bonus: 3 judged
            Round([4, 5, 6], 1, 7),  # 4 kept, 5 rejected (6 never judged): 2 judged
            Round([], 0, 8),  # no draft: the target alone
        ],
    )
    assert result.target_passes == 3
    assert result.drafted == 6
    assert result.accepted == 4
    assert result.acceptance_rate == pytest.approx(4 / 5)
    assert result.tokens_per_pass == pytest.approx(7 / 3)
    empty = SpeculativeResult([])
    assert (empty.acceptance_rate, empty.tokens_per_pass, empty.target_passes) == (0.0, 0.0, 0)


def test_rounds_record_what_was_drafted_kept_and_added(target):
    result = speculative_generate(target, ModelDrafter(noisy_copy(target, 1, noise=0.3)), PROMPT, 20, k=3)
    tokens = []
    for r in result.rounds:
        tokens += r.drafted[: r.accepted] + [r.target_token]
        assert r.accepted <= len(r.drafted) <= 3
        if r.accepted < len(r.drafted):
            assert r.target_token != r.drafted[r.accepted]  # greedy: the replacement differs from the draft
    assert tokens == result.tokens
    assert len(result.tokens) == 20


# ---------------------------------------------------------------------------------------------
# Bad inputs


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(k=0), r"k \(draft tokens per round\) must be an integer >= 1, got 0"),
        (dict(k=2.0), r"k \(draft tokens per round\) must be an integer >= 1"),
        (dict(k=True), r"k \(draft tokens per round\) must be an integer >= 1"),
        (dict(max_tokens=0), r"max_tokens must be a positive integer, got 0"),
        (dict(max_tokens=3.0), r"max_tokens must be a positive integer"),
        (dict(max_tokens=59), r"a 6-token prompt plus max_tokens=59 exceeds the model's context of 64 tokens"),
        (dict(params=SamplingParams(logit_bias={50: 1.0})), r"logit_bias names token ids \[50\]"),
    ],
)
def test_speculative_generate_refuses_bad_arguments(target, kwargs, message):
    with pytest.raises(ValueError, match=message):
        speculative_generate(target, PromptLookupDrafter(), PROMPT, **{"max_tokens": 4, "k": 2, **kwargs})


def test_speculative_generate_may_fill_the_context_exactly(target):
    result = speculative_generate(target, PromptLookupDrafter(), PROMPT, 58, k=4)
    assert result.tokens == greedy_generate(target, PROMPT, 58)


# --- a draft distilled on its target's choices ------------------------------------------------------


def test_target_choices_are_its_greedy_continuations_and_its_argmax_everywhere():
    target = tiny_model(0)
    prompts = torch.tensor([PROMPT, [5, 4, 3, 2, 1, 0]])
    inputs, labels = target_choices(target, prompts, 10, batch_size=1)
    assert inputs.shape == labels.shape == (2, 6 + 10 - 1)
    assert torch.equal(inputs, target.generate(prompts, 10)[:, :-1])
    assert torch.equal(labels[:, 5:-1], inputs[:, 6:])  # past the prompt, the argmax is the next greedy token
    with torch.no_grad():
        assert torch.equal(labels, target(inputs).logits.argmax(-1))


def test_agreement_counts_positions_where_the_argmaxes_match():
    target = tiny_model(0)
    inputs, labels = target_choices(target, torch.tensor([PROMPT]), 10)
    assert agreement(target, inputs, labels) == 1.0
    flipped = labels.clone()
    flipped[0, :3] = (labels[0, :3] + 1) % 50
    assert agreement(target, inputs, flipped) == pytest.approx(1 - 3 / labels.numel())


def test_distilling_a_draft_on_the_target_raises_its_agreement_and_is_seeded():
    target = tiny_model(0)
    prompts = torch.randint(50, (48, 4), generator=torch.Generator().manual_seed(1))
    inputs, labels = target_choices(target, prompts, 12)
    draft = tiny_model(7, n_layer=1)
    before = agreement(draft, inputs, labels)
    losses = distill_draft(draft, inputs, labels, steps=60, batch_size=16, learning_rate=1e-2, seed=0)
    assert len(losses) == 60 and losses[-1] < losses[0]
    assert agreement(draft, inputs, labels) > before + 0.2
    again = tiny_model(7, n_layer=1)
    assert distill_draft(again, inputs, labels, steps=60, batch_size=16, learning_rate=1e-2, seed=0) == losses


def test_distilling_refuses_a_batch_larger_than_the_data_and_bad_prompts():
    target = tiny_model(0)
    inputs, labels = target_choices(target, torch.tensor([PROMPT]), 4)
    with pytest.raises(ValueError, match="batch_size"):
        distill_draft(tiny_model(1), inputs, labels, steps=1, batch_size=2)
    with pytest.raises(ValueError, match="prompts must be token ids of shape"):
        target_choices(target, torch.tensor(PROMPT), 4)


def test_the_shipped_draft_records_its_distillation_from_shipped_checkpoints():
    import json
    import shlex

    from minigpt.train import CHECKPOINT_DIR

    checkpoint = torch.load(CHECKPOINT_DIR / "nano-draft.pt", weights_only=True)
    arguments = shlex.split(checkpoint["command"])
    assert arguments[:4] == ["python", "-m", "minigpt.speculative", "distill"]
    for flag in ("--target", "--draft"):
        assert (CHECKPOINT_DIR.parent.parent / arguments[arguments.index(flag) + 1]).is_file()
    history = json.loads(checkpoint["history"])
    assert history["agreement_after"] > history["agreement_before"]


def test_distill_command_saves_a_draft_that_records_its_command(tmp_path, capsys):
    import json

    from minigpt.model import preset
    from minigpt.speculative import main
    from minigpt.train import TrainConfig, load_checkpoint, save_checkpoint

    for name, seed in (("target", 0), ("draft", 1)):
        torch.manual_seed(seed)
        save_checkpoint(tmp_path / f"{name}.pt", GPT(preset("nano", context=32)), None, 0, TrainConfig(preset="nano"), {})
    out = tmp_path / "distilled.pt"
    main(["distill", "--target", str(tmp_path / "target.pt"), "--draft", str(tmp_path / "draft.pt"), "--prompts", "8",
          "--prompt-tokens", "8", "--new-tokens", "8", "--steps", "2", "--batch-size", "4", "--out", str(out)])
    assert "agreement with the target's argmax" in capsys.readouterr().out
    draft, checkpoint = load_checkpoint(out)
    assert draft.config.n_layer == 2 and checkpoint["command"].startswith("python -m minigpt.speculative distill")
    assert set(json.loads(checkpoint["history"])) >= {"agreement_before", "agreement_after", "train_loss"}
