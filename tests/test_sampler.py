"""Tests for minigpt/sampler.py: each logits processor against hand-computed numbers, the order of
temperature and truncation, SamplingParams validation, `complete` (seeds, n, max_tokens, logprobs,
errors), stop sequences that span token boundaries, UTF-8-safe streaming, the KV-cache `Decoder`
(drafts, rejections, dynamic NTK), `KVCache.truncate` / `reorder`, and beam search against brute force.

Tiny models throughout (one or two layers, width 32). Random models at the default init give nearly
uniform, self-repeating outputs, so `lively` re-draws the weights at a scale where the next token
depends on the context.
"""

import itertools
import math

import pytest
import torch

import minigpt.sampler as sampler
from minigpt.attention import KVCache
from minigpt.model import GPT, GPTConfig
from minigpt.sampler import (
    Beam,
    Decoder,
    SamplingParams,
    StopWatcher,
    add_logit_bias,
    apply_penalties,
    apply_temperature,
    beam_search,
    complete,
    min_p_filter,
    next_token_probabilities,
    process_logits,
    stream,
    top_k_filter,
    top_p_filter,
)
from minigpt.tokenizer import Tokenizer
from minigpt.train import load_tokenizer

INF = math.inf
DYNAMIC_NTK = dict(rope_scaling="dynamic-ntk", rope_factor=4.0, rope_original_context=8)


def tiny_model(seed: int = 0, embedding_std: float | None = None, **overrides) -> GPT:
    """A small random GPT; with `embedding_std`, re-drawn so its outputs vary (see `lively`)."""
    torch.manual_seed(seed)
    fields = dict(vocab_size=50, context=64, n_layer=2, n_head=2, n_kv_head=1, n_embd=32)
    if embedding_std is not None:
        fields["tie_embeddings"] = False
    model = GPT(GPTConfig(**{**fields, **overrides})).eval()
    return model if embedding_std is None else lively(model, embedding_std)


@torch.no_grad()
def lively(model: GPT, embedding_std: float) -> GPT:
    """Every matrix re-drawn at std 1 / sqrt(fan_in) (logits of std about 1), the embedding at `embedding_std`.

    Untied, the output layer no longer favours the input token, so greedy text does not just repeat it.
    """
    for p in model.parameters():
        if p.ndim == 2:
            p.normal_(0, 1 / p.shape[1] ** 0.5)
    model.token_embedding.weight.normal_(0, embedding_std)  # (tied: also the output layer)
    return model


@torch.no_grad()
def last_logits(model: GPT, ids: list[int]) -> torch.Tensor:
    """The reference: a plain forward pass over `ids`, no cache; the next-token logits (vocab,)."""
    return model(torch.tensor([ids])).logits[0, -1].float()


def greedy_generate(model: GPT, prompt: list[int], n: int, use_cache: bool = True) -> list[int]:
    return model.generate(torch.tensor([prompt]), n, temperature=0.0, use_cache=use_cache)[0, len(prompt):].tolist()


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return load_tokenizer("minigpt-8k")


@pytest.fixture(scope="module")
def word_model(tok) -> GPT:
    """A random model over the course tokenizer's 8,192 ids whose greedy text varies from token to token."""
    return tiny_model(0, embedding_std=0.1, vocab_size=tok.n_vocab, n_layer=1, tie_embeddings=True)


# ---------------------------------------------------------------------------------------------
# The logits processors, by hand


def test_logit_bias_adds_to_the_named_ids_only_and_broadcasts_over_rows():
    logits = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert add_logit_bias(logits, {0: 5, 3: -100}).tolist() == [6.0, 2.0, 3.0, -96.0]
    assert add_logit_bias(logits, {}).tolist() == [1.0, 2.0, 3.0, 4.0]
    rows = torch.zeros(2, 4)
    assert add_logit_bias(rows, {1: 2.5}).tolist() == [[0, 2.5, 0, 0], [0, 2.5, 0, 0]]


def test_penalties_follow_openai_counts_times_frequency_plus_presence_once():
    logits = torch.tensor([1.0, 1.0, 1.0, 1.0])
    counts = torch.tensor([0.0, 1.0, 3.0, 0.0])
    # token 1: 1 - 1 * 0.25 - 0.5 = 0.25; token 2: 1 - 3 * 0.25 - 0.5 = -0.25; unseen tokens untouched
    assert apply_penalties(logits, counts, presence=0.5, frequency=0.25).tolist() == [1.0, 0.25, -0.25, 1.0]
    # negative penalties encourage repeats: token 2: 1 + 3 * 1 + 2 = 6
    assert apply_penalties(logits, counts, presence=-2, frequency=-1).tolist() == [1.0, 4.0, 6.0, 1.0]
    assert apply_penalties(logits, counts, 0, 0).tolist() == [1.0, 1.0, 1.0, 1.0]


def test_temperature_divides_the_logits():
    assert apply_temperature(torch.tensor([2.0, -4.0]), 0.5).tolist() == [4.0, -8.0]
    assert apply_temperature(torch.tensor([2.0, -4.0]), 2.0).tolist() == [1.0, -2.0]


def test_top_k_keeps_the_k_largest_and_everything_tied_with_the_kth():
    logits = torch.tensor([3.0, 1.0, 2.0, 2.0, 0.0])
    assert top_k_filter(logits, 1).tolist() == [3.0, -INF, -INF, -INF, -INF]
    # k = 2: the 2nd largest is 2.0, held by two tokens; both stay
    assert top_k_filter(logits, 2).tolist() == [3.0, -INF, 2.0, 2.0, -INF]
    assert top_k_filter(logits, 4).tolist() == [3.0, 1.0, 2.0, 2.0, -INF]
    assert top_k_filter(logits, 0).tolist() == logits.tolist()  # 0 keeps all
    assert top_k_filter(logits, 9).tolist() == logits.tolist()  # k above the vocabulary keeps all


def test_top_k_works_row_by_row():
    logits = torch.tensor([[0.0, 5.0, 1.0], [7.0, 2.0, 3.0]])
    assert top_k_filter(logits, 1).tolist() == [[-INF, 5.0, -INF], [7.0, -INF, -INF]]


# Probabilities 1/2, 1/4, 1/8, 1/8 in a scrambled order: exact in binary, so the sums below are exact.
SCRAMBLED = torch.tensor([0.125, 0.5, 0.125, 0.25]).log()


@pytest.mark.parametrize(
    "top_p, kept",
    [
        # sorted: 0.5 (id 1), 0.25 (id 3), 0.125 (ids 0 and 2); cumulative 0.5, 0.75, 0.875, 1.0
        (0.3, [1]),  # 0.5 already reaches 0.3
        (0.6, [1, 3]),  # 0.5 < 0.6 <= 0.75
        (0.8, [1, 3, 0]),  # 0.75 < 0.8 <= 0.875; the tie at 1/8 keeps the lower id first (stable sort)
        (1e-9, [1]),  # the most likely token always stays
        (1.0, [0, 1, 2, 3]),
    ],
)
def test_top_p_keeps_the_smallest_set_of_tokens_whose_probability_reaches_p(top_p, kept):
    filtered = top_p_filter(SCRAMBLED, top_p)
    assert sorted(torch.isfinite(filtered).nonzero().flatten().tolist()) == sorted(kept)
    assert torch.equal(filtered[kept], SCRAMBLED[kept])  # the survivors keep their logits


def test_top_p_works_row_by_row():
    logits = torch.stack([SCRAMBLED, SCRAMBLED.flip(0)])  # row 1: probabilities 1/4, 1/8, 1/2, 1/8
    kept = torch.isfinite(top_p_filter(logits, 0.6))
    assert kept.tolist() == [[False, True, False, True], [True, False, True, False]]


@pytest.mark.parametrize(
    "min_p, kept",
    [
        (0.0, [0, 1, 2, 3]),
        (0.2, [0, 1, 2, 3]),  # threshold 0.2 * 0.5 = 0.1: every token (>= 0.125) stays
        (0.3, [1, 3]),  # threshold 0.15: the two 1/8 tokens go
        (0.6, [1]),  # threshold 0.3: only the 1/2 token
        (1.0, [1]),  # only the most likely
    ],
)
def test_min_p_keeps_tokens_at_least_min_p_times_the_top_probability(min_p, kept):
    filtered = min_p_filter(SCRAMBLED, min_p)
    assert torch.isfinite(filtered).nonzero().flatten().tolist() == kept


# p = (0.6, 0.3, 0.1). At temperature 2 the tempered distribution is proportional to sqrt(p):
# sqrt = (0.7746, 0.5477, 0.3162), sum 1.6385, so (0.4727, 0.3343, 0.1930).
P3 = torch.tensor([0.6, 0.3, 0.1])
TEMPERED = P3.sqrt() / P3.sqrt().sum()


def test_temperature_first_and_last_differ_for_top_p():
    params = dict(temperature=2.0, top_p=0.55)
    first = next_token_probabilities(P3.log(), SamplingParams(**params))
    last = next_token_probabilities(P3.log(), SamplingParams(**params, temperature_last=True))
    # temperature first: the nucleus of (0.4727, 0.3343, 0.1930) at 0.55 is the top two (0.4727 < 0.55)
    two = TEMPERED[:2] / TEMPERED[:2].sum()  # (0.5858, 0.4142)
    torch.testing.assert_close(first, torch.cat([two, torch.zeros(1)]))
    # temperature last: the nucleus of (0.6, 0.3, 0.1) at 0.55 is the top token alone
    torch.testing.assert_close(last, torch.tensor([1.0, 0.0, 0.0]))


def test_temperature_first_and_last_differ_for_min_p():
    params = dict(temperature=2.0, min_p=0.4)
    first = next_token_probabilities(P3.log(), SamplingParams(**params))
    last = next_token_probabilities(P3.log(), SamplingParams(**params, temperature_last=True))
    # temperature first: threshold 0.4 * 0.4727 = 0.189 < 0.1930, so all three stay
    torch.testing.assert_close(first, TEMPERED)
    # temperature last: threshold 0.4 * 0.6 = 0.24 drops the 0.1 token; then temperature 2 on the two left
    two = TEMPERED[:2] / TEMPERED[:2].sum()
    torch.testing.assert_close(last, torch.cat([two, torch.zeros(1)]))


def test_temperature_first_and_last_agree_for_top_k():
    logits = torch.tensor([0.3, -1.2, 2.0, 0.9, 0.0])
    for temperature in (0.5, 1.7):
        first = next_token_probabilities(logits, SamplingParams(temperature=temperature, top_k=3))
        last = next_token_probabilities(logits, SamplingParams(temperature=temperature, top_k=3, temperature_last=True))
        torch.testing.assert_close(first, last)
        kept = torch.tensor([2, 3, 0])
        want = torch.zeros(5)
        want[kept] = (logits[kept] / temperature).softmax(dim=-1)
        torch.testing.assert_close(first, want)


def test_process_logits_applies_bias_then_penalties_then_temperature():
    logits = torch.tensor([1.0, 2.0, 3.0])
    counts = torch.tensor([0.0, 2.0, 0.0])
    params = SamplingParams(temperature=0.5, logit_bias={0: 1.0}, frequency_penalty=0.5, presence_penalty=1.0)
    # bias: (2, 2, 3); penalties: token 1 loses 2 * 0.5 + 1 = 2 -> (2, 0, 3); temperature 0.5: (4, 0, 6)
    assert process_logits(logits, params, counts).tolist() == [4.0, 0.0, 6.0]


def test_temperature_zero_is_a_one_hot_on_the_argmax_after_bias_and_penalties():
    logits = torch.tensor([1.0, 3.0, 2.0])
    assert next_token_probabilities(logits, SamplingParams(temperature=0)).tolist() == [0.0, 1.0, 0.0]
    # truncation does not apply, the bias does
    greedy = SamplingParams(temperature=0, top_k=1, top_p=0.1, min_p=0.9, logit_bias={0: 5})
    assert next_token_probabilities(logits, greedy).tolist() == [1.0, 0.0, 0.0]
    penalised = SamplingParams(temperature=0, presence_penalty=2)
    assert next_token_probabilities(logits, penalised, torch.tensor([0.0, 1.0, 0.0])).tolist() == [0.0, 0.0, 1.0]


# ---------------------------------------------------------------------------------------------
# SamplingParams validation


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(temperature=-0.1), r"temperature must be in \[0, 2\]"),
        (dict(temperature=2.5), r"temperature must be in \[0, 2\]"),
        (dict(temperature=math.nan), r"temperature must be a number in \[0, 2\]"),
        (dict(temperature=True), r"temperature must be a number in \[0, 2\]"),
        (dict(temperature="1"), r"temperature must be a number in \[0, 2\]"),
        (dict(temperature=None), r"temperature must be a number in \[0, 2\]"),
        (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
        (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
        (dict(top_p=math.nan), r"top_p must be a number in \(0, 1\]"),
        (dict(top_k=-1), r"top_k must be an integer >= 0"),
        (dict(top_k=2.0), r"top_k must be an integer >= 0"),
        (dict(top_k=True), r"top_k must be an integer >= 0"),
        (dict(min_p=-0.01), r"min_p must be in \[0, 1\]"),
        (dict(min_p=1.01), r"min_p must be in \[0, 1\]"),
        (dict(min_p=False), r"min_p must be a number in \[0, 1\]"),
        (dict(presence_penalty=2.1), r"presence_penalty must be in \[-2, 2\]"),
        (dict(presence_penalty=-3), r"presence_penalty must be in \[-2, 2\]"),
        (dict(frequency_penalty=-2.5), r"frequency_penalty must be in \[-2, 2\]"),
        (dict(frequency_penalty=math.nan), r"frequency_penalty must be a number in \[-2, 2\]"),
        (dict(logit_bias={3: 101}), r"logit_bias\[3\] must be in \[-100, 100\]"),
        (dict(logit_bias={3: -100.5}), r"logit_bias\[3\] must be in \[-100, 100\]"),
        (dict(logit_bias={3: "1"}), r"logit_bias\[3\] must be a number in \[-100, 100\]"),
        (dict(logit_bias={3: math.nan}), r"logit_bias\[3\] must be a number in \[-100, 100\]"),
        (dict(logit_bias={-1: 1}), r"logit_bias keys must be token ids"),
        (dict(logit_bias={"a": 1}), r"logit_bias keys must be token ids"),
        (dict(logit_bias={True: 1}), r"logit_bias keys must be token ids"),
        (dict(logit_bias=[(3, 1.0)]), r"logit_bias must map token ids to biases"),
    ],
)
def test_sampling_params_refuse_values_outside_their_range_naming_the_parameter(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_sampling_params_accept_the_ends_of_every_range():
    for kwargs in (
        dict(temperature=0), dict(temperature=2), dict(top_p=1), dict(top_p=1e-6), dict(top_k=0), dict(top_k=10**6),
        dict(min_p=0), dict(min_p=1), dict(presence_penalty=-2), dict(frequency_penalty=2),
        dict(logit_bias={0: -100, 7: 100}),
    ):
        SamplingParams(**kwargs)


def test_check_vocabulary_refuses_bias_for_a_token_the_model_lacks():
    params = SamplingParams(logit_bias={3: 1, 50: 2, 99: -1})
    with pytest.raises(ValueError, match=r"logit_bias names token ids \[50, 99\], outside the vocabulary \[0, 50\)"):
        params.check_vocabulary(50)
    params.check_vocabulary(100)  # every id known: no error


# ---------------------------------------------------------------------------------------------
# complete: seeds, n, max_tokens, finish reasons, logprobs


def test_the_same_seed_gives_the_same_choices_and_another_seed_other_choices(word_model, tok):
    run = lambda seed: complete(word_model, tok, "Once upon a time", max_tokens=12, n=2, seed=seed)
    first, again, other = run(7), run(7), run(8)
    assert [c.token_ids for c in first.choices] == [c.token_ids for c in again.choices]
    assert [c.text for c in first.choices] == [c.text for c in again.choices]
    assert [c.token_ids for c in first.choices] != [c.token_ids for c in other.choices]


def test_n_gives_independent_choices_and_bills_every_token(word_model, tok):
    result = complete(word_model, tok, "Once upon a time", max_tokens=8, n=3, seed=0)
    assert [c.index for c in result.choices] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in result.choices}) > 1  # not one choice copied three times
    assert result.prompt_tokens == len(tok.encode("Once upon a time"))
    assert result.completion_tokens == sum(len(c.token_ids) for c in result.choices)


def test_max_tokens_ends_a_choice_with_finish_reason_length(word_model, tok):
    no_end = SamplingParams(logit_bias={tok.special_tokens["<|endoftext|>"]: -100})
    result = complete(word_model, tok, "Once upon a time", max_tokens=5, n=2, seed=3, params=no_end)
    for choice in result.choices:
        assert len(choice.token_ids) == 5
        assert choice.finish_reason == "length"
        assert choice.text == tok.decode(choice.token_ids)
    assert result.completion_tokens == 10


def test_the_end_of_text_token_ends_a_choice_with_finish_reason_stop_and_is_not_returned(word_model, tok):
    forced_end = SamplingParams(logit_bias={tok.special_tokens["<|endoftext|>"]: 100})
    (choice,) = complete(word_model, tok, "Once upon a time", max_tokens=5, seed=0, params=forced_end).choices
    assert (choice.text, choice.token_ids, choice.finish_reason) == ("", [], "stop")


def test_greedy_complete_equals_model_generate_at_temperature_zero(word_model, tok):
    prompt = tok.encode("Once upon a time")
    result = complete(word_model, tok, prompt, max_tokens=20, params=SamplingParams(temperature=0))
    (choice,) = result.choices
    assert choice.finish_reason == "length"
    assert choice.token_ids == greedy_generate(word_model, prompt, 20)
    assert choice.text == tok.decode(choice.token_ids)


def test_a_prompt_may_be_text_ids_or_a_tensor(word_model, tok):
    ids = tok.encode("Once upon a time")
    greedy = SamplingParams(temperature=0)
    texts = {complete(word_model, tok, prompt, max_tokens=4, params=greedy).choices[0].text
             for prompt in ("Once upon a time", ids, torch.tensor([ids]))}
    assert len(texts) == 1


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_each_logprob_is_the_log_softmax_of_the_models_own_logits_at_that_position(word_model, tok, temperature):
    prompt = tok.encode("Once upon a time")
    params = SamplingParams(temperature=temperature, top_k=50)  # processors do not change the reported logprobs
    (choice,) = complete(word_model, tok, prompt, max_tokens=6, seed=4, logprobs=True, top_logprobs=5,
                         params=params).choices
    assert len(choice.logprobs) == len(choice.token_ids) == 6
    for i, entry in enumerate(choice.logprobs):
        want = last_logits(word_model, prompt + choice.token_ids[:i]).log_softmax(dim=-1)
        assert entry.token_id == choice.token_ids[i]
        assert entry.token == tok.decode_tokens_bytes([entry.token_id])[0]
        assert entry.logprob == pytest.approx(float(want[entry.token_id]), abs=1e-4)
        ids, values = zip(*entry.top_logprobs)
        assert len(entry.top_logprobs) == 5
        assert list(values) == sorted(values, reverse=True)
        assert list(ids) == want.topk(5).indices.tolist()
        assert list(values) == pytest.approx(want.topk(5).values.tolist(), abs=1e-4)
        if entry.token_id == int(want.argmax()):
            assert entry.top_logprobs[0] == (entry.token_id, pytest.approx(entry.logprob))
    if temperature == 0:  # greedy always takes the argmax, so the branch above ran every time
        assert all(e.top_logprobs[0][0] == e.token_id for e in choice.logprobs)


def test_logprobs_without_top_logprobs_list_no_alternatives_and_no_logprobs_gives_none(word_model, tok):
    with_logprobs = complete(word_model, tok, "Hi", max_tokens=3, seed=0, logprobs=True).choices[0]
    assert [e.top_logprobs for e in with_logprobs.logprobs] == [[], [], []]
    assert complete(word_model, tok, "Hi", max_tokens=3, seed=0).choices[0].logprobs is None


def test_complete_refuses_a_prompt_plus_max_tokens_beyond_the_context(word_model, tok):
    prompt = list(range(60))  # context 64
    with pytest.raises(ValueError, match=r"60-token prompt plus max_tokens=5 exceeds the model's context of 64 "
                                         r"tokens; ask for at most 4 tokens"):
        complete(word_model, tok, prompt, max_tokens=5)
    no_end = SamplingParams(logit_bias={tok.special_tokens["<|endoftext|>"]: -100})
    assert len(complete(word_model, tok, prompt, max_tokens=4, seed=0, params=no_end).choices[0].token_ids) == 4


def test_complete_refuses_a_prompt_that_fills_the_context(word_model, tok):
    with pytest.raises(ValueError, match=r"the prompt has 64 tokens, which leaves no room in the model's context of 64"):
        complete(word_model, tok, list(range(64)))
    with pytest.raises(ValueError, match=r"the prompt has 70 tokens"):
        complete(word_model, tok, list(range(70)), max_tokens=1)


def test_complete_without_max_tokens_may_fill_the_rest_of_the_context(word_model, tok):
    no_end = SamplingParams(logit_bias={tok.special_tokens["<|endoftext|>"]: -100})
    (choice,) = complete(word_model, tok, list(range(60)), seed=0, params=no_end).choices
    assert len(choice.token_ids) == 4 and choice.finish_reason == "length"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(n=0), r"n must be an integer >= 1, got 0"),
        (dict(n=True), r"n must be an integer >= 1"),
        (dict(max_tokens=0), r"max_tokens must be a positive integer, got 0"),
        (dict(max_tokens=2.0), r"max_tokens must be a positive integer"),
        (dict(stop=["a", "b", "c", "d", "e"]), r"stop must be up to 4 non-empty strings"),
        (dict(stop=[""]), r"stop must be up to 4 non-empty strings"),
        (dict(stop=""), r"stop must be up to 4 non-empty strings"),
        (dict(stop=["a", 3]), r"stop must be up to 4 non-empty strings"),
        (dict(logprobs=True, top_logprobs=21), r"top_logprobs must be an integer from 0 to 20, got 21"),
        (dict(logprobs=True, top_logprobs=-1), r"top_logprobs must be an integer from 0 to 20, got -1"),
        (dict(params=SamplingParams(logit_bias={8192: 1.0})), r"logit_bias names token ids \[8192\], outside the "
                                                              r"vocabulary \[0, 8192\)"),
    ],
)
def test_complete_refuses_bad_requests_with_a_clear_message(word_model, tok, kwargs, message):
    with pytest.raises(ValueError, match=message):
        complete(word_model, tok, "Hello", **{"max_tokens": 3, **kwargs})


def test_complete_accepts_four_stop_sequences_and_twenty_top_logprobs(word_model, tok):
    result = complete(word_model, tok, "Hello", max_tokens=2, seed=0, stop=["w", "x", "y", "z"], logprobs=True,
                      top_logprobs=20)
    assert all(len(e.top_logprobs) == 20 for e in result.choices[0].logprobs)


def test_special_token_text_in_a_text_prompt_is_refused(word_model, tok):
    with pytest.raises(ValueError, match=r"special token '<\|endoftext\|>'"):
        complete(word_model, tok, "Hello <|endoftext|> world", max_tokens=2)
    with pytest.raises(ValueError, match=r"special token '<\|im_start\|>'"):
        list(stream(word_model, tok, "<|im_start|>user", max_tokens=2))


def test_an_empty_prompt_of_ids_is_refused(word_model, tok):
    with pytest.raises(ValueError, match="the prompt is empty"):
        complete(word_model, tok, [], max_tokens=2)


def test_an_empty_text_prompt_is_refused_with_the_same_clear_message(word_model, tok):
    with pytest.raises(ValueError, match="the prompt is empty"):
        complete(word_model, tok, "", max_tokens=2)


# ---------------------------------------------------------------------------------------------
# Stop sequences


def spanning_stop(texts: list[str]) -> str:
    """A stop string that starts inside one token, covers the next, and ends inside the one after."""
    for a, b, c in zip(texts, texts[1:], texts[2:]):
        if all(t.isascii() and t.isprintable() for t in (a, b, c)) and len(a) >= 3 and len(c) >= 2:
            return a[-2:] + b + c[:1]
    raise AssertionError(f"no three printable ASCII tokens in a row in {texts}")


def test_a_stop_spanning_three_tokens_ends_the_text_right_before_it(word_model, tok):
    prompt, greedy = tok.encode("Once upon a time"), SamplingParams(temperature=0)
    free = complete(word_model, tok, prompt, max_tokens=24, params=greedy).choices[0]
    texts = [tok.decode([t]) for t in free.token_ids]
    stop = spanning_stop(texts)
    start = free.text.find(stop)
    ends = list(itertools.accumulate(len(t) for t in texts))  # where each token's text ends
    completing = next(i for i, end in enumerate(ends) if end >= start + len(stop))  # the token that finishes it
    assert completing >= 2 and ends[completing - 2] > start  # the stop really starts two tokens earlier or more

    stopped = complete(word_model, tok, prompt, max_tokens=24, params=greedy, stop=["never", stop]).choices[0]
    assert stopped.text == free.text[:start]
    assert stop not in stopped.text
    assert stopped.finish_reason == "stop"
    assert stopped.token_ids == free.token_ids[: completing + 1]  # decoding ended at the token that completed it

    chunks = list(stream(word_model, tok, prompt, max_tokens=24, params=greedy, stop=stop))
    assert "".join(c.text for c in chunks) == free.text[:start]
    assert chunks[-1].finish_reason == "stop"


def test_stop_text_that_never_appears_changes_nothing(word_model, tok):
    greedy = SamplingParams(temperature=0)
    free = complete(word_model, tok, "Once upon a time", max_tokens=10, params=greedy).choices[0]
    assert "\x00\x01" not in free.text
    watched = complete(word_model, tok, "Once upon a time", max_tokens=10, params=greedy, stop="\x00\x01").choices[0]
    assert (watched.text, watched.token_ids, watched.finish_reason) == (free.text, free.token_ids, "length")


def test_stop_watcher_finds_a_stop_split_across_chunks_and_never_shows_it():
    watcher = StopWatcher(["END"])
    assert watcher.feed(b"abcE") == "abc"  # "E" could start "END": held back
    assert watcher.feed(b"N") == ""
    assert not watcher.stopped
    assert watcher.feed(b"Dxyz") == ""
    assert watcher.stopped
    assert watcher.finish() == ""


def test_stop_watcher_releases_a_held_prefix_once_it_is_not_a_stop():
    watcher = StopWatcher(["END"])
    assert watcher.feed(b"abEN") == "ab"
    assert watcher.feed(b"x") == "ENx"
    assert watcher.feed(b"E") == ""
    assert watcher.finish() == "E"  # at the end of decoding a held tail is text after all
    assert not watcher.stopped


def test_stop_watcher_handles_a_stop_whose_prefix_repeats():
    watcher, shown = StopWatcher(["aab"]), []
    for byte in b"xaaab":
        shown.append(watcher.feed(bytes([byte])))
    # "a", "aa" are held; at "aaa" only the last two can still start "aab", so the first "a" is shown
    assert shown == ["x", "", "", "a", ""]
    assert watcher.stopped


def test_stop_watcher_takes_the_earliest_of_several_stops():
    watcher = StopWatcher(["cd", "b"])
    assert watcher.feed(b"abcd") == "a" and watcher.stopped
    # across chunks: "b" of "bcd" is held; "cx" then completes at index 2 while "bcd" fails
    watcher = StopWatcher(["bcd", "cx"])
    assert watcher.feed(b"ab") == "a"
    assert watcher.feed(b"cx") == "b"
    assert watcher.stopped
    # two stops complete in the same chunk: the one that starts first wins
    watcher = StopWatcher(["yz", "xyz!"])
    assert watcher.feed(b"0xyz!") == "0" and watcher.stopped


def test_stop_watcher_waits_for_whole_characters_and_matches_stops_with_multibyte_characters():
    watcher = StopWatcher(["é!"])
    assert watcher.feed(b"a\xc3") == "a"  # half of "é" is not text yet
    assert watcher.feed(b"\xa9") == ""  # "é" could start the stop
    assert watcher.feed(b"!") == "" and watcher.stopped
    watcher = StopWatcher(["世"])
    assert [watcher.feed(bytes([b])) for b in "a世".encode()] == ["a", "", "", ""]
    assert watcher.stopped


def test_stop_watcher_fed_byte_by_byte_shows_only_whole_characters():
    text = "aé世€😀b"
    watcher, chunks = StopWatcher(["zz"]), []
    for byte in text.encode():
        chunks.append(watcher.feed(bytes([byte])))
    chunks.append(watcher.finish())
    assert "".join(chunks) == text
    for chunk in chunks:
        assert "\ufffd" not in chunk
        chunk.encode("utf-8")  # no lone surrogate


def test_stop_watcher_finish_turns_an_unfinished_character_into_a_replacement_character():
    watcher = StopWatcher()
    assert watcher.feed(b"ok\xe4\xb8") == "ok"
    assert watcher.finish() == "\ufffd"


# ---------------------------------------------------------------------------------------------
# Streaming and characters split over tokens


SCRIPT = [b"a", b"\xc3", b"\xa9", b"\xe4\xb8", b"\x96"]  # "a", then "é" in two tokens, "世" in two


@pytest.fixture(scope="module")
def split_tok() -> Tokenizer:
    """Byte tokens plus one merge, b"\\xe4\\xb8": the first two bytes of "世" (a partial character)."""
    ranks = {bytes([b]): b for b in range(256)}
    ranks[b"\xe4\xb8"] = 256
    return Tokenizer(ranks, name="split")


@pytest.fixture(scope="module")
def script_model(split_tok) -> GPT:
    """A bigram model with weights set by hand: after each token of SCRIPT comes the next (cyclically),
    with a logit margin of about 57, so even sampling at temperature 1 follows the script.

    Attention and MLP outputs are zeroed, so each block is the identity; token i of SCRIPT embeds as
    the unit vector e_i, which the final RMSNorm scales to sqrt(32) e_i, and the output row of the
    next token is 10 e_i.
    """
    ids = [piece[0] if len(piece) == 1 else 256 for piece in SCRIPT]
    model = tiny_model(0, vocab_size=split_tok.n_vocab, n_layer=1, tie_embeddings=False)
    with torch.no_grad():
        for block in model.blocks:
            block.attention.out.weight.zero_()
            block.mlp.down.weight.zero_()
        model.token_embedding.weight.zero_()
        model.lm_head.weight.zero_()
        for i, token in enumerate(ids):
            model.token_embedding.weight[token, i] = 1.0
            model.lm_head.weight[ids[(i + 1) % len(ids)], i] = 10.0
    return model


def test_the_script_model_spells_characters_split_over_tokens(script_model, split_tok):
    tokens = complete(script_model, split_tok, [97], max_tokens=8, seed=0).choices[0].token_ids
    assert tokens == [0xC3, 0xA9, 256, 0x96, 97, 0xC3, 0xA9, 256]
    assert split_tok.decode([0xC3]) == "\ufffd"  # a token decoded alone is not a character


# from the prompt "a": tokens c3, a9 | e4b8, 96 | "a" | c3, a9 | e4b8, 96 | ...
@pytest.mark.parametrize("max_tokens, text", [(4, "é世"), (7, "é世aé"), (9, "é世aé世")])
def test_stream_chunks_are_whole_characters_and_join_to_the_completion_text(script_model, split_tok, max_tokens, text):
    chunks = list(stream(script_model, split_tok, [97], max_tokens=max_tokens, seed=0))
    (choice,) = complete(script_model, split_tok, [97], max_tokens=max_tokens, seed=0).choices
    assert choice.text == text
    assert "".join(c.text for c in chunks) == choice.text
    for chunk in chunks:
        assert "\ufffd" not in chunk.text
        chunk.text.encode("utf-8")  # would raise on a lone surrogate
    assert [c.finish_reason for c in chunks] == [None] * (len(chunks) - 1) + ["length"]


def test_streaming_a_sampled_completion_gives_the_same_text_as_complete(word_model, tok):
    params = SamplingParams(temperature=1.2, top_p=0.9)
    text = complete(word_model, tok, "Once upon a time", max_tokens=16, seed=11, params=params).choices[0].text
    chunks = list(stream(word_model, tok, "Once upon a time", max_tokens=16, seed=11, params=params))
    assert "".join(c.text for c in chunks) == text
    assert chunks[-1].finish_reason == "length"
    assert all(c.finish_reason is None for c in chunks[:-1])


def test_a_stop_inside_split_characters_ends_the_text_before_it(script_model, split_tok):
    (choice,) = complete(script_model, split_tok, [97], max_tokens=12, seed=0, stop="世a").choices
    assert (choice.text, choice.finish_reason) == ("é", "stop")
    assert choice.token_ids == [0xC3, 0xA9, 256, 0x96, 97]
    chunks = list(stream(script_model, split_tok, [97], max_tokens=12, seed=0, stop=["xyz", "é"]))
    assert chunks == [sampler.StreamChunk("", "stop")]


def test_max_tokens_in_the_middle_of_a_character_ends_with_a_replacement_character(script_model, split_tok):
    # documented in StopWatcher.finish: an unfinished character becomes U+FFFD
    (choice,) = complete(script_model, split_tok, [97], max_tokens=3, seed=0).choices
    assert choice.token_ids == [0xC3, 0xA9, 256]
    assert choice.text == "é\ufffd"


# ---------------------------------------------------------------------------------------------
# The Decoder and the KV cache


def test_decoder_logits_equal_a_plain_forward_while_committing_tokens_and_scoring_drafts():
    model = tiny_model(1, embedding_std=1.0)
    prompt = [3, 14, 15, 9, 2, 6]
    decoder = Decoder(model, prompt)
    torch.testing.assert_close(decoder.logits()[-1], last_logits(model, prompt), atol=1e-5, rtol=0)
    for token in [5, 35, 8, 9]:
        decoder.commit([token])
        torch.testing.assert_close(decoder.logits()[-1], last_logits(model, decoder.tokens), atol=1e-5, rtol=0)
        assert len(decoder.cache) == len(decoder.tokens)  # the cache is in use, not a recompute

    def check_drafts(extra):
        rows = decoder.logits(extra)
        assert rows.shape == (len(extra) + 1, 50)
        for i in range(len(extra) + 1):
            want = last_logits(model, decoder.tokens + extra[:i])
            torch.testing.assert_close(rows[i], want, atol=1e-5, rtol=0)

    # as in speculative decoding, every round commits a token the cache has not seen before drafts are scored
    decoder.commit([21])
    check_drafts([7, 7, 1])
    decoder.commit([7, 40])  # the first draft kept, then a token other than the second draft
    check_drafts([11, 12])
    decoder.commit([13])  # every draft rejected
    check_drafts([2, 4, 8, 16])
    decoder.commit([2, 4, 8, 16, 3])  # every draft kept, plus the target's own token
    torch.testing.assert_close(decoder.logits()[-1], last_logits(model, decoder.tokens), atol=1e-5, rtol=0)
    assert len(decoder.cache) == len(decoder.tokens)
    assert decoder.forward_passes == 1 + 4 + 1 + 1 + 1 + 1


def test_decoder_scores_drafts_right_after_a_plain_call_without_a_commit():
    model = tiny_model(1, embedding_std=1.0)
    prompt = [3, 14, 15, 9, 2, 6]
    decoder = Decoder(model, prompt)
    decoder.logits()
    rows = decoder.logits([7, 7, 1])
    assert rows.shape == (4, 50)
    for i in range(4):
        torch.testing.assert_close(rows[i], last_logits(model, prompt + [7, 7, 1][:i]), atol=1e-5, rtol=0)


def test_decoder_refuses_a_sequence_longer_than_the_context():
    model = tiny_model(0, context=8)
    decoder = Decoder(model, [1, 2, 3, 4, 5, 6])
    decoder.logits([7, 8])
    with pytest.raises(ValueError, match="9 tokens exceed the model's context of 8"):
        decoder.logits([7, 8, 9])


@pytest.fixture(scope="module")
def ntk_model() -> GPT:
    """Dynamic NTK with an original context of 8 in a context of 32, weights large enough that positions matter."""
    return tiny_model(0, embedding_std=1.0, context=32, **DYNAMIC_NTK)


def test_stale_dynamic_ntk_keys_would_change_the_logits(ntk_model):
    # why the sampler must recompute: keys cached at length <= 8 are rotated with another base than at 20
    sequence = torch.randint(0, 50, (20,), generator=torch.Generator().manual_seed(0)).tolist()
    cache = ntk_model.new_kv_cache(1)
    with torch.no_grad():
        ntk_model(torch.tensor([sequence[:8]]), kv_cache=cache)
        stale = ntk_model(torch.tensor([sequence[8:]]), kv_cache=cache).logits[0, -1]
    assert (stale - last_logits(ntk_model, sequence)).abs().max() > 1e-2


def test_decoding_past_the_dynamic_ntk_original_context_matches_a_recompute(ntk_model, tok, monkeypatch):
    prompt, greedy = [1, 2, 3, 4, 5], SamplingParams(temperature=0)
    cached = complete(ntk_model, tok, prompt, max_tokens=20, params=greedy).choices[0].token_ids
    assert cached == complete(ntk_model, tok, prompt, max_tokens=20, params=greedy, use_cache=False).choices[0].token_ids
    assert cached == greedy_generate(ntk_model, prompt, 20, use_cache=False)
    sampled = dict(max_tokens=20, seed=5, params=SamplingParams(temperature=1.0))
    with_cache = complete(ntk_model, tok, prompt, **sampled).choices[0].token_ids
    assert with_cache == complete(ntk_model, tok, prompt, **sampled, use_cache=False).choices[0].token_ids
    # the comparison has teeth: a sampler that trusted the cache would decode differently
    monkeypatch.setattr(sampler, "cached_keys_stay_exact", lambda scaling, length: True)
    assert complete(ntk_model, tok, prompt, max_tokens=20, params=greedy).choices[0].token_ids != cached


def test_decoder_scores_drafts_past_the_dynamic_ntk_context_by_recomputing(ntk_model):
    decoder = Decoder(ntk_model, [1, 2, 3, 4, 5, 6, 7])
    rows = decoder.logits([8, 9, 10])  # 10 tokens, past the original 8: no cache from here on
    assert decoder.cache is None
    torch.testing.assert_close(rows[-1], last_logits(ntk_model, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]), atol=1e-5, rtol=0)


def test_decoder_draft_rows_past_the_dynamic_ntk_context_equal_a_forward_over_each_prefix(ntk_model):
    prompt, extra = [1, 2, 3, 4, 5, 6, 7], [8, 9, 10]
    rows = Decoder(ntk_model, prompt).logits(extra)
    for i in range(len(extra) + 1):
        torch.testing.assert_close(rows[i], last_logits(ntk_model, prompt + extra[:i]), atol=1e-4, rtol=0)


def filled_cache(batch: int = 1, positions: int = 5) -> KVCache:
    """A 2-layer cache whose entry at (layer, row, position) is layer * 100 + row * 10 + position."""
    cache = KVCache(n_layer=2, batch_size=batch, n_kv_head=1, head_dim=4, max_len=8)
    for layer in range(2):
        values = torch.tensor([[layer * 100 + row * 10 + p for p in range(positions)] for row in range(batch)],
                              dtype=torch.float32)
        k = values[:, None, :, None].expand(batch, 1, positions, 4)
        cache.append(layer, k, -k)
    return cache


def test_kv_cache_truncate_forgets_positions_and_appends_after_them():
    cache = filled_cache()
    cache.truncate(3)
    assert len(cache) == 3 and cache.lengths == [3, 3]
    k, v = cache.append(0, torch.full((1, 1, 1, 4), 77.0), torch.full((1, 1, 1, 4), -77.0))
    assert k[0, 0, :, 0].tolist() == [0, 1, 2, 77]
    assert v[0, 0, :, 0].tolist() == [0, -1, -2, -77]
    cache.truncate(3)  # a no-op at the current length
    cache.truncate(0)
    assert len(cache) == 0 and cache.lengths == [0, 0]


@pytest.mark.parametrize("length", [6, -1, 2.0, "3", None, True])
def test_kv_cache_truncate_refuses_lengths_it_does_not_hold(length):
    cache = filled_cache()
    with pytest.raises(ValueError, match=r"length must be an integer from 0 to the 5 positions stored"):
        cache.truncate(length)
    assert len(cache) == 5


def test_kv_cache_reorder_lets_each_row_take_another_rows_keys_and_values():
    cache = filled_cache(batch=3)
    cache.reorder(torch.tensor([2, 0, 0]))
    assert cache.k[1, :, 0, :5, 0].tolist() == [[120, 121, 122, 123, 124], [100, 101, 102, 103, 104],
                                                [100, 101, 102, 103, 104]]
    assert cache.v[0, 0, 0, :5, 0].tolist() == [-20, -21, -22, -23, -24]
    assert len(cache) == 5
    k, _ = cache.append(0, torch.zeros(3, 1, 1, 4), torch.zeros(3, 1, 1, 4))  # rows stay usable
    assert k.shape == (3, 1, 6, 4)


@pytest.mark.parametrize("rows", [[0, 1, 2], torch.tensor([0, 1]), torch.tensor([[0, 1, 2]]), torch.tensor(1)])
def test_kv_cache_reorder_refuses_rows_that_are_not_one_index_per_batch_row(rows):
    cache = filled_cache(batch=3)
    with pytest.raises(ValueError, match=r"rows must be a 1-D tensor of 3 batch indices"):
        cache.reorder(rows)


# ---------------------------------------------------------------------------------------------
# Beam search


@torch.no_grad()
def sequence_logprob(model: GPT, prompt: list[int], continuation: list[int]) -> float:
    """The total log-probability of `continuation`, one plain forward per prefix (exact under dynamic NTK too)."""
    return sum(float(last_logits(model, prompt + continuation[:i]).log_softmax(dim=-1)[token])
               for i, token in enumerate(continuation))


def test_beam_search_with_one_beam_is_greedy():
    model = tiny_model(2, embedding_std=1.0)
    prompt = [4, 8, 15, 16, 23, 42]
    (beam,) = beam_search(model, prompt, num_beams=1, max_tokens=10)
    assert beam.token_ids == greedy_generate(model, prompt, 10)
    assert beam.logprob == pytest.approx(sequence_logprob(model, prompt, beam.token_ids), abs=1e-4)


@pytest.mark.parametrize("length_penalty", [0.0, 1.0, 2.0, -0.5])
def test_beams_come_sorted_by_logprob_over_length_to_the_penalty(length_penalty):
    model = tiny_model(2, embedding_std=1.0)
    prompt = [4, 8, 15]
    end = greedy_generate(model, prompt, 1)[0]  # the likeliest first token ends beams early: lengths differ
    beams = beam_search(model, prompt, num_beams=4, max_tokens=5, length_penalty=length_penalty, end_token=end)
    assert len(beams) == 4 and all(isinstance(b, Beam) for b in beams)
    assert len({len(b.token_ids) for b in beams}) > 1 or length_penalty > 0  # long beams win at length_penalty > 0
    scores = [b.score for b in beams]
    assert scores == sorted(scores, reverse=True)
    for beam in beams:
        assert beam.score == pytest.approx(beam.logprob / len(beam.token_ids) ** length_penalty)
        assert beam.logprob == pytest.approx(sequence_logprob(model, prompt, beam.token_ids), abs=1e-4)


def beam_search_by_definition(table: dict[tuple, float], vocab: int, num_beams: int, steps: int) -> list[tuple]:
    """Beam search read off a brute-force table of every sequence's total logprob: at each step keep
    the `num_beams` best one-token extensions of the kept prefixes."""
    kept = [()]
    for _ in range(steps):
        candidates = [prefix + (token,) for prefix in kept for token in range(vocab)]
        kept = sorted(candidates, key=table.__getitem__, reverse=True)[:num_beams]
    return kept


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_beam_search_on_a_tiny_vocabulary_matches_brute_force(seed):
    vocab, steps, prompt = 6, 3, [1, 4, 2]
    model = tiny_model(seed, embedding_std=2.0, vocab_size=vocab)
    # every sequence of 3 tokens (216): the logits of one forward over prompt + sequence score all its tokens
    table = {}
    for sequence in itertools.product(range(vocab), repeat=steps):
        with torch.no_grad():
            logp = model(torch.tensor([prompt + list(sequence)])).logits[0].float().log_softmax(dim=-1)
        for i in range(1, steps + 1):
            table[sequence[:i]] = sum(float(logp[len(prompt) - 1 + j, sequence[j]]) for j in range(i))
    beams = beam_search(model, prompt, num_beams=vocab - 1, max_tokens=steps, length_penalty=0.0)
    assert [tuple(b.token_ids) for b in beams] == beam_search_by_definition(table, vocab, vocab - 1, steps)
    for beam in beams:
        assert beam.logprob == pytest.approx(table[tuple(beam.token_ids)], abs=1e-4)
    # with five of six beams kept, the best of the 216 sequences survives here (checked for these seeds)
    best = max((s for s in table if len(s) == steps), key=table.get)
    assert tuple(beams[0].token_ids) == best


def test_an_end_token_finishes_a_beam():
    model = tiny_model(2, embedding_std=1.0)
    prompt = [4, 8, 15]
    first = greedy_generate(model, prompt, 1)[0]
    (beam,) = beam_search(model, prompt, num_beams=1, max_tokens=6, end_token=first)
    assert beam.token_ids == [first]  # the most likely first token ends the search at once
    assert beam.score == pytest.approx(beam.logprob)
    beams = beam_search(model, prompt, num_beams=3, max_tokens=6, end_token=first, length_penalty=0.0)
    assert [first] in [b.token_ids for b in beams]
    for beam in beams:
        assert first not in beam.token_ids[:-1]  # a beam ends at its end token
        assert len(beam.token_ids) == 6 or beam.token_ids[-1] == first


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_beams=0), r"num_beams must be an integer from 1 to 49 \(below the vocabulary\), got 0"),
        (dict(num_beams=50), r"num_beams must be an integer from 1 to 49"),
        (dict(num_beams=2.0), r"num_beams must be an integer from 1 to 49"),
        (dict(num_beams=True), r"num_beams must be an integer from 1 to 49"),
        (dict(length_penalty=math.nan), r"length_penalty must be a number in \[-10, 10\]"),
        (dict(length_penalty=11), r"length_penalty must be in \[-10, 10\]"),
        (dict(length_penalty="1"), r"length_penalty must be a number"),
        (dict(max_tokens=62), r"3-token prompt plus max_tokens=62 exceeds the model's context of 64"),
        (dict(max_tokens=0), r"max_tokens must be a positive integer"),
    ],
)
def test_beam_search_refuses_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        beam_search(tiny_model(0), [1, 2, 3], **{"num_beams": 2, "max_tokens": 4, **kwargs})


def test_beam_search_past_the_dynamic_ntk_context_equals_a_search_that_always_recomputes(monkeypatch):
    model = tiny_model(3, embedding_std=1.0, vocab_size=12, context=16, rope_scaling="dynamic-ntk",
                       rope_factor=4.0, rope_original_context=4)
    prompt = [1, 2, 3]  # 3 tokens; the search passes the original context of 4 at its second step
    beams = beam_search(model, prompt, num_beams=3, max_tokens=6, length_penalty=0.0)
    for beam in beams:
        assert beam.logprob == pytest.approx(sequence_logprob(model, prompt, beam.token_ids), abs=1e-4)
    with monkeypatch.context() as patched:
        patched.setattr(model, "new_kv_cache", lambda *args, **kwargs: None)  # no cache: every step recomputes
        recomputed = beam_search(model, prompt, num_beams=3, max_tokens=6, length_penalty=0.0)
    assert [b.token_ids for b in recomputed] == [b.token_ids for b in beams]
    assert [b.logprob for b in recomputed] == pytest.approx([b.logprob for b in beams], abs=1e-4)
    # and the comparison has teeth: trusting the stale cache gives other totals
    monkeypatch.setattr(sampler, "cached_keys_stay_exact", lambda scaling, length: True)
    stale = beam_search(model, prompt, num_beams=3, max_tokens=6, length_penalty=0.0)
    assert [(b.token_ids, round(b.logprob, 3)) for b in stale] != [(b.token_ids, round(b.logprob, 3)) for b in beams]
