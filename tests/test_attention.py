"""Tests for minigpt/attention.py: the written-out attention against PyTorch's reference kernel,
the fused `sdpa_attention`, the returned weights, chunked attention with its online softmax, the
causal mask (and the cached copy `sdpa_attention` shares between layers), the KV cache, the memory
chunked attention saves, and clear errors on bad inputs.

References are built here, independently of the module: the mask with `torch.tril`, grouped
key/value heads with `repeat_interleave`, and the kernel is `F.scaled_dot_product_attention`.
Comparisons are in float64 with tight tolerances, plus float32 checks with looser ones.
"""

import weakref

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from minigpt.attention import (
    KVCache,
    _shared_causal_mask,
    attention,
    causal_mask,
    check_qkv,
    chunked_attention,
    expand_kv,
    kv_cache_bytes,
    sdpa_attention,
)

HEAD_DIM = 16

# (batch, n_head, n_kv_head, T_q, T_k): MHA, GQA (8 heads / 2 kv heads) and MQA; a full pass
# (T_q == T_k) and cached decoding (T_q = 1 and T_q = 3 new queries after the keys); batch > 1.
CASES = [
    pytest.param(2, 4, 4, 7, 7, id="mha-full-b2"),
    pytest.param(2, 8, 2, 7, 7, id="gqa8x2-full-b2"),
    pytest.param(1, 4, 1, 6, 6, id="mqa-full-b1"),
    pytest.param(3, 4, 1, 6, 6, id="mqa-full-b3"),
    pytest.param(2, 4, 4, 1, 10, id="mha-decode1"),
    pytest.param(2, 8, 2, 1, 10, id="gqa8x2-decode1"),
    pytest.param(3, 4, 1, 1, 10, id="mqa-decode1"),
    pytest.param(2, 4, 4, 3, 10, id="mha-decode3"),
    pytest.param(2, 8, 2, 3, 10, id="gqa8x2-decode3"),
    pytest.param(3, 4, 1, 3, 10, id="mqa-decode3"),
]
CAUSAL = [pytest.param(True, id="causal"), pytest.param(False, id="full")]


def make_qkv(batch, n_head, n_kv_head, n_queries, n_keys, dtype=torch.float64, seed=0, head_dim=HEAD_DIM):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, n_head, n_queries, head_dim, generator=gen, dtype=dtype)
    k = torch.randn(batch, n_kv_head, n_keys, head_dim, generator=gen, dtype=dtype)
    v = torch.randn(batch, n_kv_head, n_keys, head_dim, generator=gen, dtype=dtype)
    return q, k, v


def reference_mask(n_queries, n_keys):
    """True where a query may attend; the queries are the last `n_queries` of `n_keys` positions."""
    if n_queries == n_keys:
        return torch.tril(torch.ones(n_queries, n_keys)).bool()
    return torch.ones(n_queries, n_keys).tril(diagonal=n_keys - n_queries).bool()


def repeat_kv(t, n_head):
    return t.repeat_interleave(n_head // t.shape[1], dim=1)


def reference_attention(q, k, v, causal):
    mask = reference_mask(q.shape[2], k.shape[2]) if causal else None
    return F.scaled_dot_product_attention(q, repeat_kv(k, q.shape[1]), repeat_kv(v, q.shape[1]), attn_mask=mask)


# --------------------------------------------------------------------------- attention vs SDPA


@pytest.mark.parametrize("causal", CAUSAL)
@pytest.mark.parametrize("batch, n_head, n_kv_head, n_queries, n_keys", CASES)
def test_attention_matches_torch_sdpa(batch, n_head, n_kv_head, n_queries, n_keys, causal):
    q, k, v = make_qkv(batch, n_head, n_kv_head, n_queries, n_keys)
    out = attention(q, k, v, causal=causal)
    assert out.shape == (batch, n_head, n_queries, HEAD_DIM)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, reference_attention(q, k, v, causal), rtol=1e-10, atol=1e-10)


def test_attention_non_causal_with_more_queries_than_keys():
    q, k, v = make_qkv(2, 8, 2, 5, 3)
    torch.testing.assert_close(attention(q, k, v, causal=False), reference_attention(q, k, v, False))
    torch.testing.assert_close(sdpa_attention(q, k, v, causal=False), reference_attention(q, k, v, False))


def test_causal_decoding_is_bottom_right_aligned():
    """With 3 queries after 10 keys, query 0 stands at position 7: it sees keys 0..7, not only key 0."""
    q, k, v = make_qkv(1, 2, 2, 3, 10)
    top_left = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # the wrong alignment here
    out = attention(q, k, v, causal=True)
    assert not torch.allclose(out, top_left)
    # Keys and values at positions 8 and 9 are in query 0's future (it stands at 7) but visible to
    # the later queries: changing them must leave query 0's output exactly as it was.
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 8:] += 5.0
    v2[:, :, 8:] -= 3.0
    out2 = attention(q, k2, v2, causal=True)
    torch.testing.assert_close(out2[:, :, 0], out[:, :, 0], rtol=0, atol=0)
    assert not torch.allclose(out2[:, :, 1:], out[:, :, 1:])


@pytest.mark.parametrize("causal", CAUSAL)
@pytest.mark.parametrize("n_queries, n_keys", [(7, 7), (3, 10), (1, 10)])
def test_gqa_query_head_uses_kv_head_h_div_group(n_queries, n_keys, causal):
    """Query head h uses kv head h // (n_head // n_kv_head): consecutive query heads share a kv head."""
    n_head, n_kv_head = 8, 2
    group = n_head // n_kv_head
    q, k, v = make_qkv(2, n_head, n_kv_head, n_queries, n_keys, seed=3)
    out = attention(q, k, v, causal=causal)
    for h in range(n_head):
        kv = h // group
        single = attention(q[:, h : h + 1], k[:, kv : kv + 1], v[:, kv : kv + 1], causal=causal)
        torch.testing.assert_close(out[:, h : h + 1], single, rtol=1e-12, atol=1e-12)
    # The other plausible layout (tiling, h % n_kv_head) gives a different answer: the test can tell.
    tiled = F.scaled_dot_product_attention(
        q,
        k.repeat(1, group, 1, 1),
        v.repeat(1, group, 1, 1),
        attn_mask=reference_mask(n_queries, n_keys) if causal else None,
    )
    assert not torch.allclose(out, tiled)


def test_expand_kv_is_repeat_interleave():
    _, k, v = make_qkv(2, 8, 2, 1, 5)
    k8, v8 = expand_kv(k, v, 8)
    assert torch.equal(k8, k.repeat_interleave(4, dim=1))
    assert torch.equal(v8, v.repeat_interleave(4, dim=1))
    k4, v4 = expand_kv(k, v, 2)  # MHA: unchanged
    assert torch.equal(k4, k) and torch.equal(v4, v)


@pytest.mark.parametrize("fn", [attention, sdpa_attention, chunked_attention])
@pytest.mark.parametrize("causal", CAUSAL)
def test_float32_matches_reference_loosely(fn, causal):
    n_queries = 5 if causal else 12  # cached decoding when causal, a full pass otherwise
    q, k, v = make_qkv(2, 8, 2, n_queries, 12, dtype=torch.float32, seed=7)
    out = fn(q, k, v, causal=causal)
    assert out.dtype == torch.float32
    expected = reference_attention(q.double(), k.double(), v.double(), causal).float()
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- sdpa_attention


@pytest.mark.parametrize("causal", CAUSAL)
@pytest.mark.parametrize("batch, n_head, n_kv_head, n_queries, n_keys", CASES)
def test_sdpa_attention_matches_attention(batch, n_head, n_kv_head, n_queries, n_keys, causal):
    q, k, v = make_qkv(batch, n_head, n_kv_head, n_queries, n_keys, seed=1)
    out = sdpa_attention(q, k, v, causal=causal)
    assert out.shape == (batch, n_head, n_queries, HEAD_DIM)
    torch.testing.assert_close(out, attention(q, k, v, causal=causal), rtol=1e-10, atol=1e-10)


# --------------------------------------------------------------------------- weights


@pytest.mark.parametrize("causal", CAUSAL)
@pytest.mark.parametrize("batch, n_head, n_kv_head, n_queries, n_keys", CASES)
def test_attention_weights(batch, n_head, n_kv_head, n_queries, n_keys, causal):
    q, k, v = make_qkv(batch, n_head, n_kv_head, n_queries, n_keys, seed=2)
    out, weights = attention(q, k, v, causal=causal, return_weights=True)
    assert weights.shape == (batch, n_head, n_queries, n_keys)
    torch.testing.assert_close(out, attention(q, k, v, causal=causal), rtol=0, atol=0)
    torch.testing.assert_close(
        weights.sum(dim=-1), torch.ones(batch, n_head, n_queries, dtype=torch.float64), rtol=0, atol=1e-12
    )
    allowed = reference_mask(n_queries, n_keys) if causal else torch.ones(n_queries, n_keys, dtype=torch.bool)
    assert torch.all(weights[..., ~allowed] == 0)  # exactly zero in the future
    assert torch.all(weights[..., allowed] > 0)  # softmax of finite scores: strictly positive
    # The weights are the softmax of the scaled scores, computed here by hand.
    scores = q @ repeat_kv(k, n_head).transpose(-2, -1) / HEAD_DIM**0.5
    expected = torch.exp(scores - scores.amax(dim=-1, keepdim=True)) * allowed
    expected = expected / expected.sum(dim=-1, keepdim=True)
    torch.testing.assert_close(weights, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(weights @ repeat_kv(v, n_head), out, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------- chunked attention

CHUNK_COMBOS = [  # (T_q, T_k, chunk_size)
    (8, 8, 1),
    (8, 8, 3),
    (8, 8, 4),
    (8, 8, 8),
    (8, 8, 20),
    (13, 13, 5),
    (13, 13, 12),
    (17, 17, 16),
    (1, 10, 1),
    (1, 10, 3),
    (1, 10, 64),
    (3, 10, 1),
    (3, 10, 2),
    (3, 10, 4),
    (5, 17, 16),
    (6, 19, 7),
]
HEADS = [pytest.param(4, 4, id="mha"), pytest.param(8, 2, id="gqa8x2"), pytest.param(4, 1, id="mqa")]


@pytest.mark.parametrize("causal", CAUSAL)
@pytest.mark.parametrize("n_head, n_kv_head", HEADS)
@pytest.mark.parametrize("n_queries, n_keys, chunk_size", CHUNK_COMBOS)
def test_chunked_attention_matches_attention(n_queries, n_keys, chunk_size, n_head, n_kv_head, causal):
    q, k, v = make_qkv(2, n_head, n_kv_head, n_queries, n_keys, seed=4)
    out = chunked_attention(q, k, v, causal=causal, chunk_size=chunk_size)
    assert out.shape == q.shape and out.dtype == q.dtype
    torch.testing.assert_close(out, attention(q, k, v, causal=causal), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("causal", CAUSAL)
def test_chunked_attention_does_not_depend_on_chunk_size(causal):
    q, k, v = make_qkv(2, 8, 2, 11, 19, seed=5)
    if not causal:
        q = make_qkv(2, 8, 2, 23, 19, seed=6)[0]  # non-causal also allows more queries than keys
    first = chunked_attention(q, k, v, causal=causal, chunk_size=1)
    for chunk_size in range(2, 26):
        out = chunked_attention(q, k, v, causal=causal, chunk_size=chunk_size)
        torch.testing.assert_close(out, first, rtol=1e-12, atol=1e-12, msg=f"chunk_size={chunk_size}")


@pytest.mark.parametrize("causal", CAUSAL)
def test_chunked_attention_online_softmax_is_stable(causal):
    """Scores in the thousands overflow a naive exp; keys that grow along the sequence keep raising
    the running maximum, so every later block rescales what came before."""
    q, k, v = make_qkv(1, 4, 2, 24, 24, seed=8)
    growth = torch.linspace(1.0, 40.0, 24, dtype=torch.float64)[None, None, :, None]
    q, k = q * 20.0, k.abs() * growth  # positive keys: the largest scores come late for q > 0
    q = q.abs()
    scores = q @ repeat_kv(k, 4).transpose(-2, -1) / HEAD_DIM**0.5
    assert scores.max() > 1000  # exp would overflow even in float64
    out = chunked_attention(q, k, v, causal=causal, chunk_size=5)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, attention(q, k, v, causal=causal), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("causal", CAUSAL)
def test_chunked_attention_gradients_match(causal):
    q, k, v = make_qkv(2, 4, 2, 9, 9, seed=9)
    weight = torch.randn(2, 4, 9, HEAD_DIM, generator=torch.Generator().manual_seed(10), dtype=torch.float64)
    grads = []
    for fn in (attention, lambda *a, **kw: chunked_attention(*a, **kw, chunk_size=4)):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        (fn(*leaves, causal=causal) * weight).sum().backward()
        grads.append([t.grad for t in leaves])
    for expected, actual in zip(*grads):
        torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-10)


# --------------------------------------------------------------------------- causal_mask


def test_causal_mask_square_by_hand():
    expected = torch.tensor(
        [
            [True, False, False],
            [True, True, False],
            [True, True, True],
        ]
    )
    mask = causal_mask(3, 3)
    assert mask.dtype == torch.bool
    assert torch.equal(mask, expected)


def test_causal_mask_fewer_queries_by_hand():
    # Two queries after four keys stand at positions 2 and 3.
    expected = torch.tensor(
        [
            [True, True, True, False],
            [True, True, True, True],
        ]
    )
    assert torch.equal(causal_mask(2, 4), expected)
    assert torch.equal(causal_mask(1, 4), torch.tensor([[True, True, True, True]]))


@pytest.mark.parametrize("n_queries, n_keys", [(9, 9), (4, 9), (1, 6)])
def test_causal_mask_matches_reference(n_queries, n_keys):
    assert torch.equal(causal_mask(n_queries, n_keys), reference_mask(n_queries, n_keys))


@pytest.mark.parametrize("n_queries, n_keys", [(9, 9), (4, 9)])
def test_causal_mask_blocks_are_slices_of_the_full_mask(n_queries, n_keys):
    full = causal_mask(n_queries, n_keys)
    offset = n_keys - n_queries
    for q0 in range(n_queries):
        for q1 in range(q0 + 1, n_queries + 1):
            for k0 in range(n_keys):
                for k1 in range(k0 + 1, n_keys + 1):
                    block = causal_mask(q1 - q0, k1 - k0, first_query=offset + q0, first_key=k0)
                    assert torch.equal(block, full[q0:q1, k0:k1]), (q0, q1, k0, k1)


@pytest.mark.parametrize("n_queries, n_keys", [(3, 7), (2, 10), (5, 5), (1, 4)])
def test_shared_causal_mask_equals_causal_mask_and_is_made_once_per_shape(n_queries, n_keys):
    device = torch.device("cpu")
    mask = _shared_causal_mask(n_queries, n_keys, device)
    assert mask.dtype == torch.bool and torch.equal(mask, causal_mask(n_queries, n_keys, device))
    assert _shared_causal_mask(n_queries, n_keys, device) is mask  # every layer of a pass gets this one tensor
    assert _shared_causal_mask(n_queries, n_keys + 1, device) is not mask
    assert torch.equal(_shared_causal_mask(n_queries, n_keys + 1, device), causal_mask(n_queries, n_keys + 1))


def test_sdpa_attention_with_the_shared_mask_still_equals_attention_when_called_again():
    # 3 new queries after 4 cached keys (a verify pass), twice as two layers would: the second call
    # reuses the first's mask, which SDPA must have left as it was
    q, k, v = make_qkv(2, 4, 2, 3, 7, seed=5)
    before = _shared_causal_mask.cache_info()
    first = sdpa_attention(q, k, v, causal=True)
    torch.testing.assert_close(first, attention(q, k, v, causal=True), rtol=1e-10, atol=1e-10)
    q2, k2, v2 = make_qkv(2, 4, 2, 3, 7, seed=6)
    torch.testing.assert_close(sdpa_attention(q2, k2, v2, causal=True), attention(q2, k2, v2, causal=True),
                               rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(sdpa_attention(q, k, v, causal=True), first, rtol=0, atol=0)
    after = _shared_causal_mask.cache_info()
    assert after.hits + after.misses - before.hits - before.misses == 3  # each call asked the cache...
    assert after.hits - before.hits >= 2  # ...and made the mask at most once
    assert torch.equal(_shared_causal_mask(3, 7, q.device), reference_mask(3, 7))  # SDPA left it unchanged


# --------------------------------------------------------------------------- KV cache

DECODERS = [
    pytest.param(attention, id="attention"),
    pytest.param(sdpa_attention, id="sdpa"),
    pytest.param(lambda q, k, v: chunked_attention(q, k, v, chunk_size=3), id="chunked3"),
]


@pytest.mark.parametrize("decode", DECODERS)
def test_kv_cache_decoding_matches_full_attention(decode):
    n_layer, batch, n_head, n_kv_head, total, prompt = 3, 2, 4, 2, 12, 5
    per_layer = [make_qkv(batch, n_head, n_kv_head, total, total, seed=20 + layer) for layer in range(n_layer)]
    full = [attention(q, k, v, causal=True) for q, k, v in per_layer]
    cache = KVCache(n_layer, batch, n_kv_head, HEAD_DIM, max_len=total, dtype=torch.float64)
    assert len(cache) == 0

    steps = [(0, prompt)] + [(t, t + 1) for t in range(prompt, total)]  # prefill, then one at a time
    for start, end in steps:
        for layer, (q, k, v) in enumerate(per_layer):
            k_all, v_all = cache.append(layer, k[:, :, start:end], v[:, :, start:end])
            assert cache.lengths == [end] * (layer + 1) + [start] * (n_layer - layer - 1)
            assert len(cache) == end  # follows layer 0, even while later layers lag behind
            assert torch.equal(k_all, k[:, :, :end]) and torch.equal(v_all, v[:, :, :end])
            out = decode(q[:, :, start:end], k_all, v_all)
            # The last rows of full causal attention over the whole prefix, recomputed from scratch.
            from_scratch = attention(q[:, :, :end], k[:, :, :end], v[:, :, :end], causal=True)[:, :, start:end]
            torch.testing.assert_close(out, from_scratch, rtol=1e-10, atol=1e-10)
            torch.testing.assert_close(out, full[layer][:, :, start:end], rtol=1e-10, atol=1e-10)
    assert len(cache) == total


def test_kv_cache_layers_are_independent():
    cache = KVCache(2, 1, 2, 4, max_len=6, dtype=torch.float64)
    k0, v0 = torch.ones(1, 2, 3, 4, dtype=torch.float64), torch.full((1, 2, 3, 4), 2.0, dtype=torch.float64)
    cache.append(1, k0[:, :, :2] * 7, v0[:, :, :2] * 7)  # a later layer ahead of layer 0
    assert cache.lengths == [0, 2] and len(cache) == 0  # len follows layer 0 only
    cache = KVCache(2, 1, 2, 4, max_len=6, dtype=torch.float64)
    cache.append(0, k0, v0)
    assert len(cache) == 3 and cache.lengths == [3, 0]
    k1_all, v1_all = cache.append(1, -k0[:, :, :1], -v0[:, :, :1])
    assert k1_all.shape == (1, 2, 1, 4) and torch.equal(k1_all, -k0[:, :, :1]) and torch.equal(v1_all, -v0[:, :, :1])
    k0_all, v0_all = cache.append(0, k0[:, :, :1] * 5, v0[:, :, :1] * 5)
    assert torch.equal(k0_all[:, :, :3], k0) and torch.equal(k0_all[:, :, 3:], k0[:, :, :1] * 5)
    assert torch.equal(v0_all[:, :, :3], v0)
    assert cache.lengths == [4, 1] and len(cache) == 4


def test_kv_cache_overflow_raises():
    cache = KVCache(2, 1, 2, 4, max_len=6)
    cache.append(0, torch.zeros(1, 2, 4, 4), torch.zeros(1, 2, 4, 4))
    cache.append(0, torch.zeros(1, 2, 2, 4), torch.zeros(1, 2, 2, 4))  # exactly full is fine
    assert len(cache) == 6
    with pytest.raises(ValueError, match="max_len"):
        cache.append(0, torch.zeros(1, 2, 1, 4), torch.zeros(1, 2, 1, 4))
    assert cache.lengths == [6, 0]  # a refused append leaves the cache as it was
    with pytest.raises(ValueError, match="max_len"):
        cache.append(1, torch.zeros(1, 2, 7, 4), torch.zeros(1, 2, 7, 4))  # too long in one go
    assert cache.lengths == [6, 0]


@pytest.mark.parametrize(
    "k_shape, v_shape",
    [
        pytest.param((2, 2, 1, 4), (2, 2, 1, 4), id="batch"),
        pytest.param((1, 3, 1, 4), (1, 3, 1, 4), id="n_kv_head"),
        pytest.param((1, 2, 1, 8), (1, 2, 1, 8), id="head_dim"),
        pytest.param((1, 2, 1, 4), (1, 2, 2, 4), id="k-v-mismatch"),
    ],
)
def test_kv_cache_wrong_shapes_raise(k_shape, v_shape):
    cache = KVCache(2, 1, 2, 4, max_len=6)
    with pytest.raises(ValueError, match="do not fit"):
        cache.append(0, torch.zeros(k_shape), torch.zeros(v_shape))
    assert cache.lengths == [0, 0]


@pytest.mark.parametrize("shape", [(1, 2, 3), (1, 2, 3, 4, 1)], ids=["3d", "5d"])
def test_kv_cache_wrong_ndim_raises_value_error(shape):
    cache = KVCache(2, 1, 2, 4, max_len=6)
    with pytest.raises(ValueError):
        cache.append(0, torch.zeros(shape), torch.zeros(shape))


def test_kv_cache_nbytes_by_hand():
    n_layer, batch, n_kv_head, head_dim = 3, 2, 2, 8
    cache = KVCache(n_layer, batch, n_kv_head, head_dim, max_len=10)  # float32: 4 bytes
    assert cache.nbytes() == 0
    per_position = 2 * 3 * 2 * 2 * 8 * 4  # k and v, layers, batch, kv heads, head_dim, bytes
    filled = 0
    for n_new in (4, 1, 3):
        for layer in range(n_layer):
            kv = torch.randn(batch, n_kv_head, n_new, head_dim)
            cache.append(layer, kv, kv)
        filled += n_new
        assert cache.nbytes() == per_position * filled
    assert cache.nbytes() == 768 * 8

    half = KVCache(1, 1, 1, 4, max_len=3, dtype=torch.bfloat16)
    half.append(0, torch.zeros(1, 1, 3, 4, dtype=torch.bfloat16), torch.zeros(1, 1, 3, 4, dtype=torch.bfloat16))
    assert half.nbytes() == 2 * 1 * 1 * 1 * 4 * 3 * 2


def test_kv_cache_bytes_by_hand():
    # k and v, 4 layers, 2 kv heads, head_dim 16, 32 positions, 2 bytes, batch 3
    assert kv_cache_bytes(n_layer=4, n_kv_head=2, head_dim=16, context=32, bytes_per_value=2, batch_size=3) == 49152
    assert kv_cache_bytes(4, 2, 16, 32) == 16384  # defaults: 2 bytes per value, batch 1
    assert kv_cache_bytes(4, 2, 16, 32, bytes_per_value=4) == 32768
    # A 12-layer model, 4 kv heads of 64 dims, a 1024 context in bfloat16: 12 MiB.
    assert kv_cache_bytes(12, 4, 64, 1024) == 12 * 2**20


@pytest.mark.parametrize("dtype, nbytes", [(torch.float16, 2), (torch.float32, 4)])
def test_kv_cache_bytes_matches_a_filled_cache(dtype, nbytes):
    n_layer, batch, n_kv_head, head_dim, context = 4, 3, 2, 16, 32
    cache = KVCache(n_layer, batch, n_kv_head, head_dim, max_len=context, dtype=dtype)
    for layer in range(n_layer):
        kv = torch.zeros(batch, n_kv_head, context, head_dim, dtype=dtype)
        cache.append(layer, kv, kv)
    expected = kv_cache_bytes(n_layer, n_kv_head, head_dim, context, bytes_per_value=nbytes, batch_size=batch)
    assert cache.nbytes() == expected
    assert expected == cache.k.numel() * cache.k.element_size() * 2  # the whole preallocated cache


def test_mqa_cache_is_n_head_times_smaller():
    n_head = 8
    mha = kv_cache_bytes(6, n_head, 32, 256)
    mqa = kv_cache_bytes(6, 1, 32, 256)
    gqa = kv_cache_bytes(6, 2, 32, 256)
    assert mha == n_head * mqa and mha == 4 * gqa
    caches = {}
    for n_kv_head in (n_head, 1):
        cache = KVCache(2, 1, n_kv_head, 32, max_len=16)
        for layer in range(2):
            cache.append(layer, torch.zeros(1, n_kv_head, 16, 32), torch.zeros(1, n_kv_head, 16, 32))
        caches[n_kv_head] = cache.nbytes()
    assert caches[n_head] == n_head * caches[1]


# --------------------------------------------------------------------------- memory


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for item in obj:
            yield from _tensors(item)


class LiveMemory(TorchDispatchMode):
    """Counts the bytes of tensor storages created by the ops run under it, while they are alive.

    Every aten op's outputs pass through `__torch_dispatch__`; a storage not seen before is added
    to the live total and a finalizer takes it off when it is freed. `peak` is the largest live
    total, `largest` the largest single storage. Storages of tensors that existed before (the
    inputs, reached through views) are ignored. Deterministic: it counts, it does not time.
    """

    def __init__(self, *existing):
        super().__init__()
        self.ignored = {t.untyped_storage().data_ptr() for t in existing}
        self.live, self.current, self.peak, self.largest = {}, 0, 0, 0

    def _freed(self, key):
        self.current -= self.live.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in _tensors(out):
            storage = t.untyped_storage()
            key, size = storage.data_ptr(), storage.nbytes()
            if size == 0 or key in self.ignored or key in self.live:
                continue
            self.live[key] = size
            self.current += size
            self.peak = max(self.peak, self.current)
            self.largest = max(self.largest, size)
            weakref.finalize(storage, self._freed, key)
        return out


def test_chunked_attention_memory_is_far_below_the_score_matrix():
    T, D, chunk = 4096, 32, 256
    q, k, v = make_qkv(1, 1, 1, T, T, dtype=torch.float32, seed=11, head_dim=D)
    score_bytes = T * T * 4  # 64 MiB: the (T, T) float32 scores full attention materialises

    with torch.no_grad(), LiveMemory(q, k, v) as full:
        expected = attention(q, k, v)
    # The control: the measurement does see the full score matrix (else it measures nothing).
    assert full.largest >= score_bytes and full.peak >= score_bytes

    with torch.no_grad(), LiveMemory(q, k, v) as chunked:
        out = chunked_attention(q, k, v, chunk_size=chunk)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    # Linear in T: the output (T x D) and a few chunk x chunk blocks, nowhere near T x T.
    assert chunked.largest <= max(T * D, chunk * chunk) * 4
    assert chunked.peak <= (2 * T * D + 8 * chunk * chunk) * 4
    assert chunked.peak * 16 < score_bytes


# --------------------------------------------------------------------------- bad inputs

ATTENTIONS = [
    pytest.param(attention, id="attention"),
    pytest.param(sdpa_attention, id="sdpa"),
    pytest.param(chunked_attention, id="chunked"),
]


def _ok():
    return make_qkv(2, 4, 2, 3, 5)


@pytest.mark.parametrize("fn", ATTENTIONS)
@pytest.mark.parametrize(
    "mutate, error, match",
    [
        pytest.param(lambda q, k, v: (q[0], k, v), ValueError, r"q must be 4-D", id="3d-q"),
        pytest.param(lambda q, k, v: (q, k[0], v), ValueError, r"k must be 4-D", id="3d-k"),
        pytest.param(lambda q, k, v: (q, k, v[0]), ValueError, r"v must be 4-D", id="3d-v"),
        pytest.param(lambda q, k, v: (q.long(), k, v), TypeError, r"q must be a floating-point", id="int-q"),
        pytest.param(lambda q, k, v: (q, k.int(), v.int()), TypeError, r"k must be a floating-point", id="int-kv"),
        pytest.param(lambda q, k, v: (q, k, v[:, :, :4]), ValueError, r"same shape", id="kv-time-mismatch"),
        pytest.param(lambda q, k, v: (q, k, v[:, :1]), ValueError, r"same shape", id="kv-head-mismatch"),
        pytest.param(lambda q, k, v: (q[:, :3], k, v), ValueError, r"must divide", id="kv-heads-not-dividing"),
        pytest.param(lambda q, k, v: (q[:1], k, v), ValueError, r"batch size or head_dim", id="batch-mismatch"),
        pytest.param(lambda q, k, v: (q[..., :8], k, v), ValueError, r"batch size or head_dim", id="head-dim"),
        pytest.param(
            lambda q, k, v: (q, k[:, :, :2], v[:, :, :2]), ValueError, r"at least as many keys", id="more-queries"
        ),
    ],
)
def test_bad_inputs_raise_clear_errors(fn, mutate, error, match):
    q, k, v = mutate(*_ok())
    with pytest.raises(error, match=match):
        fn(q, k, v, causal=True)


def test_check_qkv_accepts_good_inputs():
    q, k, v = _ok()
    check_qkv(q, k, v, causal=True)
    check_qkv(q, k[:, :, :2], v[:, :, :2], causal=False)  # more queries than keys is fine without a mask
    check_qkv(q, k[:, :1], v[:, :1], causal=True)  # MQA


@pytest.mark.parametrize("chunk_size", [0, -3])
def test_chunk_size_must_be_positive(chunk_size):
    q, k, v = _ok()
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_attention(q, k, v, chunk_size=chunk_size)
