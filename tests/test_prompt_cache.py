"""Tests for minigpt/prompt_cache.py: request pricing, usage validation, cache hits that match a cold
prefill (logits, K/V and greedy continuations), how many tokens are reused, LRU eviction under a
position budget, the hit/miss counters, the dynamic-NTK refusal, and clear errors on bad inputs.

Tiny models throughout (vocabulary 64, context 64, two layers), so the file runs in seconds.
"""

import pytest
import torch

from minigpt.attention import kv_cache_bytes
from minigpt.model import GPT, GPTConfig
from minigpt.prompt_cache import (
    PRICES,
    PrefillResult,
    Prices,
    PromptCache,
    Usage,
    common_prefix_length,
    request_cost,
)

CONFIG = GPTConfig(vocab_size=64, context=64, n_layer=2, n_head=2, n_kv_head=1, n_embd=32)
# Not bitwise: a hit runs only the remaining tokens, so its matmuls have other shapes than a cold
# prefill's and may sum in another order; float32 rounding then differs by ~1e-7.
TIGHT = dict(atol=1e-5, rtol=1e-5)


def tiny_model(seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    config = GPTConfig(**{**CONFIG.__dict__, **overrides})
    return GPT(config).eval()


def prompt(*ids: int) -> torch.Tensor:
    return torch.tensor([ids], dtype=torch.long)  # (1, T)


def random_prompt(length: int, seed: int) -> torch.Tensor:
    return torch.randint(0, CONFIG.vocab_size, (1, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def cold_prefill(model: GPT, prompt_ids: torch.Tensor) -> PrefillResult:
    """The reference: the whole prompt through the model into a fresh KV cache."""
    kv_cache = model.new_kv_cache(1)
    logits = model(prompt_ids, kv_cache=kv_cache, last_only=True).logits[0, -1]
    return PrefillResult(logits, kv_cache, 0)


@torch.no_grad()
def greedy_continue(model: GPT, result: PrefillResult, n_tokens: int) -> list[int]:
    """Greedy decoding from a prefill's logits and KV cache."""
    logits, kv_cache, tokens = result.logits, result.kv_cache, []
    for _ in range(n_tokens):
        tokens.append(int(logits.argmax()))
        logits = model(prompt(tokens[-1]), kv_cache=kv_cache, last_only=True).logits[0, -1]
    return tokens


# ---------------------------------------------------------------------------------------------
# Pricing


def test_prices_are_gpt41_mini_per_million_tokens():
    assert PRICES == Prices(input=0.40, cached_input=0.10, output=1.60)
    assert PRICES.cached_input == PRICES.input / 4


def test_request_cost_hand_computed():
    # 1,000 prompt tokens, 800 cached, 100 output:
    # 200 * $0.40 + 800 * $0.10 + 100 * $1.60 = $80 + $80 + $160 = $320 per 1M, so $0.00032.
    assert request_cost(Usage(1000, 800, 100)) == pytest.approx(0.00032, rel=1e-12)
    # Nothing cached: 1,000 * $0.40 + 100 * $1.60 = $560 per 1M, so $0.00056.
    assert request_cost(Usage(1000, 0, 100)) == pytest.approx(0.00056, rel=1e-12)
    # 1M prompt tokens, all cached, no output: exactly the cached price.
    assert request_cost(Usage(1_000_000, 1_000_000, 0)) == pytest.approx(0.10, rel=1e-12)
    assert request_cost(Usage(0, 0, 0)) == 0


def test_request_cost_with_other_prices():
    # 10 fresh * $1 + 10 cached * $0.5 + 10 output * $2 = $35 per 1M.
    assert request_cost(Usage(20, 10, 10), Prices(1.0, 0.5, 2.0)) == pytest.approx(35e-6, rel=1e-12)


@pytest.mark.parametrize(
    "counts, field",
    [((-1, 0, 0), "prompt_tokens"), ((10, -1, 0), "cached_tokens"), ((10, 0, -5), "completion_tokens"),
     ((10.0, 0, 0), "prompt_tokens"), ((10, True, 0), "cached_tokens"), ((10, 0, "5"), "completion_tokens"),
     ((10, 11, 0), "cached_tokens")],
)
def test_usage_rejects_bad_counts(counts, field):
    with pytest.raises(ValueError, match=field):
        Usage(*counts)


def test_request_cost_rejects_a_non_usage():
    with pytest.raises(TypeError, match="usage"):
        request_cost({"prompt_tokens": 10, "cached_tokens": 0, "completion_tokens": 0})


# ---------------------------------------------------------------------------------------------
# Hits match a cold prefill


def test_common_prefix_length():
    ids = torch.tensor([1, 2, 3, 4])
    assert common_prefix_length(ids, torch.tensor([1, 2, 3, 4])) == 4
    assert common_prefix_length(ids, torch.tensor([1, 2, 9, 4])) == 2
    assert common_prefix_length(ids, torch.tensor([1, 2])) == 2
    assert common_prefix_length(ids, torch.tensor([7, 2, 3])) == 0


@pytest.mark.parametrize("rope_scaling", ["rope", "yarn"])
def test_hit_matches_cold_prefill_and_greedy_decoding(rope_scaling):
    scaling = {} if rope_scaling == "rope" else dict(rope_scaling="yarn", rope_factor=2.0, rope_original_context=32)
    model = tiny_model(**scaling)
    first = random_prompt(40, seed=1)
    second = torch.cat([first[:, :30], random_prompt(12, seed=2)], dim=1)  # shares 30, then diverges
    cache = PromptCache(model, max_positions=200)
    cache.prefill(first)
    hit = cache.prefill(second)
    cold = cold_prefill(model, second)
    assert hit.cached_tokens == common_prefix_length(first[0], second[0]) >= 30
    assert hit.logits.shape == (CONFIG.vocab_size,) and hit.logits.dtype == torch.float32
    torch.testing.assert_close(hit.logits, cold.logits, **TIGHT)
    assert hit.kv_cache.lengths == cold.kv_cache.lengths == [42, 42]
    torch.testing.assert_close(hit.kv_cache.k[:, :, :, :42], cold.kv_cache.k[:, :, :, :42], **TIGHT)
    torch.testing.assert_close(hit.kv_cache.v[:, :, :, :42], cold.kv_cache.v[:, :, :, :42], **TIGHT)
    assert greedy_continue(model, hit, 15) == greedy_continue(model, cold, 15)


def test_greedy_continuation_matches_generate():
    model = tiny_model()
    cache = PromptCache(model, max_positions=200)
    first = random_prompt(30, seed=3)
    cache.prefill(first)
    result = cache.prefill(first)  # an exact repeat: 29 positions reused
    assert result.cached_tokens == 29
    expected = model.generate(first, max_new_tokens=10)[0, 30:].tolist()
    assert greedy_continue(model, result, 10) == expected


def test_decoding_from_a_result_leaves_the_stored_entry_intact():
    model = tiny_model()
    cache = PromptCache(model, max_positions=200)
    base = random_prompt(20, seed=4)
    greedy_continue(model, cache.prefill(base), 10)  # appends to the returned KVCache
    again = cache.prefill(base)
    torch.testing.assert_close(again.logits, cold_prefill(model, base).logits, **TIGHT)


# ---------------------------------------------------------------------------------------------
# How many tokens are reused


def test_cached_tokens_is_the_common_prefix_capped_and_rounded():
    model = tiny_model()
    cache = PromptCache(model, max_positions=1000)
    assert cache.prefill(prompt(1, 2, 3, 4, 5, 6, 7, 8)).cached_tokens == 0  # empty cache
    assert cache.prefill(prompt(1, 2, 3, 4, 5, 6, 7, 8)).cached_tokens == 7  # exact repeat: T - 1
    assert cache.prefill(prompt(1, 2, 3, 4, 5, 9, 9)).cached_tokens == 5  # shared prefix, then divergence
    assert cache.prefill(prompt(10, 11, 12)).cached_tokens == 0  # no overlap
    assert cache.prefill(prompt(1, 2, 3)).cached_tokens == 2  # a prefix of an entry: T - 1
    assert cache.prefill(prompt(1)).cached_tokens == 0  # one token must always run
    assert cache.prefill(prompt(1, 2, 3, 4, 5, 6, 7, 8, 20, 21)).cached_tokens == 8  # extends an entry


def test_cached_tokens_rounds_down_to_block_size():
    model = tiny_model()
    cache = PromptCache(model, max_positions=1000, block_size=4)
    base = list(range(1, 12))  # 11 tokens
    cache.prefill(prompt(*base))
    assert cache.prefill(prompt(*base[:7], 50, 51)).cached_tokens == 4  # shares 7
    assert cache.prefill(prompt(*base)).cached_tokens == 8  # repeat: min(11, 10) = 10, down to 8
    assert cache.prefill(prompt(*base[:3], 50)).cached_tokens == 0  # shares 3 < one block
    assert (cache.hits, cache.misses) == (2, 2)  # rounded to zero is a miss
    rounded = cache.prefill(prompt(*base[:9], 60))
    torch.testing.assert_close(rounded.logits, cold_prefill(model, prompt(*base[:9], 60)).logits, **TIGHT)


def test_longest_prefix_wins_among_entries():
    model = tiny_model()
    cache = PromptCache(model, max_positions=1000)
    cache.prefill(prompt(1, 2, 3, 40, 41))
    cache.prefill(prompt(1, 2, 3, 4, 5, 50))
    cache.prefill(prompt(1, 60, 61))
    assert cache.prefill(prompt(1, 2, 3, 4, 5, 6, 7)).cached_tokens == 5


# ---------------------------------------------------------------------------------------------
# Memory bound, eviction and counters


def test_lru_eviction_order_and_position_budget():
    # An exact repeat is a hit that stores nothing new, so it probes an entry and refreshes it.
    model = tiny_model()
    cache = PromptCache(model, max_positions=24)
    a, b, c, d, e = (prompt(first_id, *range(1, 8)) for first_id in (50, 51, 52, 53, 54))  # 8 tokens, no shared prefix
    for p in (a, b, c):
        cache.prefill(p)
    assert (len(cache), cache.stored_positions) == (3, 24)  # order, oldest first: a b c
    assert cache.prefill(a).cached_tokens == 7  # b c a
    cache.prefill(d)  # evicts b, the least recently used, not a, the oldest stored: c a d
    assert (len(cache), cache.stored_positions) == (3, 24)
    assert [cache.prefill(p).cached_tokens for p in (c, a, d)] == [7, 7, 7]  # order unchanged: c a d
    assert cache.prefill(b).cached_tokens == 0  # b was evicted; storing it again evicts c: a d b
    assert [cache.prefill(p).cached_tokens for p in (a, d, b)] == [7, 7, 7]
    assert cache.prefill(c).cached_tokens == 0  # evicts a: d b c
    assert cache.stored_positions <= 24
    cache.prefill(e)  # evicts d: b c e
    assert [cache.prefill(p).cached_tokens for p in (b, c, e)] == [7, 7, 7]
    assert cache.stored_positions == 24


def test_eviction_drops_oldest_first_and_keeps_within_budget():
    model = tiny_model()
    cache = PromptCache(model, max_positions=10)
    for first_id in range(20, 25):  # five 4-token prompts with no shared prefix
        cache.prefill(prompt(first_id, 1, 2, 3))
        assert cache.stored_positions <= 10
    assert (len(cache), cache.stored_positions) == (2, 8)  # only the two newest fit
    repeats = [cache.prefill(prompt(first_id, 1, 2, 3)).cached_tokens for first_id in (24, 23)]  # store nothing
    assert repeats == [3, 3]
    assert cache.prefill(prompt(22, 1, 2, 3)).cached_tokens == 0


def test_too_long_prompt_is_served_but_not_stored():
    model = tiny_model()
    cache = PromptCache(model, max_positions=10)
    cache.prefill(prompt(1, 2, 3))
    long_prompt = random_prompt(12, seed=5)
    result = cache.prefill(long_prompt)
    torch.testing.assert_close(result.logits, cold_prefill(model, long_prompt).logits, **TIGHT)
    assert (len(cache), cache.stored_positions) == (1, 3)  # the short entry was not evicted for it


def test_entries_subsumed_by_a_longer_prompt_are_merged():
    model = tiny_model()
    cache = PromptCache(model, max_positions=100)
    cache.prefill(prompt(1, 2, 3))
    cache.prefill(prompt(1, 2, 3, 4, 5))  # covers the first entry: it is dropped
    assert (len(cache), cache.stored_positions) == (1, 5)
    cache.prefill(prompt(1, 2))  # already covered: nothing new stored
    assert (len(cache), cache.stored_positions) == (1, 5)


def test_counters_nbytes_and_clear():
    model = tiny_model()
    cache = PromptCache(model, max_positions=100)
    cache.prefill(prompt(1, 2, 3, 4))  # miss
    cache.prefill(prompt(1, 2, 3, 4))  # hit
    cache.prefill(prompt(9, 8, 7))  # miss
    cache.prefill(prompt(1, 2, 5))  # hit
    assert (cache.hits, cache.misses) == (2, 2)
    assert cache.stored_positions == 10
    assert cache.nbytes() == kv_cache_bytes(CONFIG.n_layer, CONFIG.n_kv_head, CONFIG.head_dim, 10, bytes_per_value=4)
    cache.clear()
    assert (len(cache), cache.stored_positions, cache.nbytes(), cache.hits, cache.misses) == (0, 0, 0, 0, 0)
    assert cache.prefill(prompt(1, 2, 3, 4)).cached_tokens == 0


def test_prefill_builds_no_autograd_graph():
    model = tiny_model()
    result = PromptCache(model, max_positions=100).prefill(prompt(1, 2, 3))
    assert not result.logits.requires_grad and not result.kv_cache.k.requires_grad


# ---------------------------------------------------------------------------------------------
# Refusals and bad inputs


def test_refuses_dynamic_ntk():
    model = tiny_model(rope_scaling="dynamic-ntk", rope_factor=2.0, rope_original_context=32)
    with pytest.raises(ValueError, match="dynamic-ntk.*stale"):
        PromptCache(model, max_positions=100)


@pytest.mark.parametrize(
    "kwargs, error, name",
    [(dict(max_positions=0), ValueError, "max_positions"), (dict(max_positions=2.5), ValueError, "max_positions"),
     (dict(max_positions=10, block_size=0), ValueError, "block_size"),
     (dict(max_positions=10, block_size="4"), ValueError, "block_size")],
)
def test_rejects_bad_settings(kwargs, error, name):
    with pytest.raises(error, match=name):
        PromptCache(tiny_model(), **kwargs)


def test_rejects_a_non_gpt_model():
    with pytest.raises(TypeError, match="model"):
        PromptCache(torch.nn.Linear(2, 2), max_positions=10)


@pytest.mark.parametrize(
    "bad, error, pattern",
    [([[1, 2, 3]], TypeError, "prompt_ids"),
     (torch.tensor([[1.0, 2.0]]), TypeError, "prompt_ids"),
     (torch.tensor([[1, 2]], dtype=torch.int32), TypeError, "prompt_ids"),
     (torch.tensor([1, 2, 3]), ValueError, "prompt_ids.*batch size 1"),
     (torch.tensor([[1, 2], [3, 4]]), ValueError, "prompt_ids.*batch size 1"),
     (torch.zeros(1, 0, dtype=torch.long), ValueError, "prompt_ids"),
     (torch.tensor([[1, 64]]), ValueError, "prompt_ids.*64"),
     (torch.tensor([[-1, 2]]), ValueError, "prompt_ids"),
     (torch.zeros(1, 65, dtype=torch.long), ValueError, "prompt_ids.*64.*65")],
)
def test_rejects_bad_prompts(bad, error, pattern):
    cache = PromptCache(tiny_model(), max_positions=100)
    with pytest.raises(error, match=pattern):
        cache.prefill(bad)
    assert (len(cache), cache.hits, cache.misses) == (0, 0, 0)
