"""Tests for minigpt/model.py: presets, the building blocks, the few-row projection `project` (and
`Projection`, the layer built on it), the forward pass, the KV cache, the embedding splice point, a
training sanity check, and clear errors on bad inputs.

Small configs throughout (a vocabulary of 97, a context of 24) except where a preset is the point.
"""

import math

import pytest
import torch
import torch.nn.functional as F

import minigpt.model
from minigpt.positions import RopeScaling
from minigpt.model import (
    FEW_ROWS,
    GPT,
    IGNORE_TARGET,
    PRESETS,
    Block,
    CausalSelfAttention,
    GPTConfig,
    ModelOutput,
    Projection,
    RMSNorm,
    SwiGLU,
    describe_presets,
    preset,
    project,
)

VOCAB, CONTEXT = 97, 24
IMPLS = ["sdpa", "explicit", "chunked"]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def small_config(**overrides) -> GPTConfig:
    fields = dict(vocab_size=VOCAB, context=CONTEXT, n_layer=2, n_head=4, n_kv_head=2, n_embd=32)
    return GPTConfig(**{**fields, **overrides})


def small_model(seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    return GPT(small_config(**overrides)).eval()


def random_ids(batch: int, length: int, vocab: int = VOCAB, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def expected_parameters(c: GPTConfig) -> int:
    """The parameter count worked out by hand from the architecture (no biases)."""
    d, hd = c.n_embd, c.head_dim
    attention = d * c.n_head * hd + d * 2 * c.n_kv_head * hd + c.n_head * hd * d
    mlp = 3 * d * c.hidden
    block = attention + mlp + 2 * d  # two RMSNorm gains
    embeddings = c.vocab_size * d * (1 if c.tie_embeddings else 2)
    return embeddings + c.n_layer * block + d  # + the final norm


# ---------------------------------------------------------------------------------------------
# Presets and parameter counts


def test_preset_names_in_size_order():
    assert list(PRESETS) == ["nano", "mini", "full"]


def test_preset_parameter_counts_increase_and_sit_near_their_targets():
    counts = {name: GPT(config).num_parameters() for name, config in PRESETS.items()}
    assert counts["nano"] < counts["mini"] < counts["full"]
    assert 300_000 <= counts["nano"] <= 1_000_000  # ~0.5M
    assert 1_000_000 <= counts["mini"] <= 3_000_000  # ~2M
    assert 5_000_000 <= counts["full"] <= 12_000_000  # ~8M
    for name, config in PRESETS.items():
        assert counts[name] == expected_parameters(config), name


def test_default_mlp_width_is_eight_thirds_rounded_up_to_32():
    assert preset("nano").hidden == 192  # 8/3 * 64 = 170.7 -> 192
    assert preset("mini").hidden == 352  # 8/3 * 128 = 341.3 -> 352
    assert preset("full").hidden == 704  # 8/3 * 256 = 682.7 -> 704
    assert small_config(mlp_hidden=40).hidden == 40
    model = GPT(small_config(mlp_hidden=40))
    assert model.blocks[0].mlp.gate.weight.shape == (40, 32)


def test_describe_presets_lists_each_preset_with_its_parameter_count():
    table = describe_presets()
    lines = table.splitlines()
    assert len(lines) == 1 + len(PRESETS)
    for name, config in PRESETS.items():
        model = GPT(config)
        (line,) = [line for line in lines if line.split()[0] == name]
        assert f"{model.num_parameters():,}" in line.split()
        assert f"{model.num_parameters(embedding=False):,}" in line.split()


def test_preset_overrides_fields_without_touching_the_preset():
    config = preset("nano", context=32, vocab_size=300)
    assert (config.context, config.vocab_size) == (32, 300)
    assert (config.n_layer, config.n_head, config.n_kv_head, config.n_embd) == (2, 4, 1, 64)
    assert PRESETS["nano"].context == 256 and PRESETS["nano"].vocab_size == 8192


def test_tied_embeddings_share_one_tensor_counted_once():
    config = small_config()
    assert config.tie_embeddings
    model = GPT(config)
    assert model.lm_head.weight is model.token_embedding.weight
    assert model.num_parameters() == expected_parameters(config)
    assert model.num_parameters(embedding=False) == expected_parameters(config) - VOCAB * 32
    untied = GPT(small_config(tie_embeddings=False))
    assert untied.lm_head.weight is not untied.token_embedding.weight
    assert untied.num_parameters() == model.num_parameters() + VOCAB * 32
    assert untied.num_parameters() == sum(p.numel() for p in untied.state_dict().values())


def test_tied_model_gradient_flows_into_the_shared_table_from_both_ends():
    model = small_model()
    ids = random_ids(2, 8)
    model(ids, targets=random_ids(2, 8, seed=2)).loss.backward()
    grad = model.token_embedding.weight.grad
    assert grad is not None
    unused = sorted(set(range(VOCAB)) - set(ids.flatten().tolist()))
    assert grad[unused].abs().sum() > 0  # tokens never in the input still get the output layer's gradient


# ---------------------------------------------------------------------------------------------
# Building blocks


@pytest.mark.parametrize("scale", [1.0, 1e-3])  # at 1e-3 the mean square (~1e-6) is comparable to eps
def test_rmsnorm_equals_torch_rms_norm(scale):
    norm = RMSNorm(16, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(16))
    x = torch.randn(3, 5, 16) * scale
    want = F.rms_norm(x, (16,), weight=norm.weight, eps=1e-5)
    torch.testing.assert_close(norm(x), want, rtol=1e-5, atol=1e-6)


def test_rmsnorm_output_has_unit_root_mean_square_with_unit_gain():
    x = torch.randn(4, 32) * 7 + 3
    y = RMSNorm(32, eps=0.0)(x)
    torch.testing.assert_close(y.pow(2).mean(dim=-1).sqrt(), torch.ones(4), rtol=1e-5, atol=0)


def test_swiglu_equals_hand_written_gated_mlp():
    mlp = SwiGLU(12, 20)
    x = torch.randn(2, 3, 12)
    gate = x @ mlp.gate.weight.T
    up = x @ mlp.up.weight.T
    want = (gate * torch.sigmoid(gate) * up) @ mlp.down.weight.T
    torch.testing.assert_close(mlp(x), want, rtol=1e-5, atol=1e-6)
    assert all(layer.bias is None for layer in (mlp.gate, mlp.up, mlp.down))


def test_block_is_pre_norm_residual():
    # with zeroed output projections both sublayers add nothing: the block is the identity
    config = small_config()
    block = Block(config)
    with torch.no_grad():
        block.attention.out.weight.zero_()
        block.mlp.down.weight.zero_()
    x = torch.randn(2, 6, 32)
    cos, sin = GPT(config).rotary(0, 6)
    out, weights = block(x, cos, sin)
    assert torch.equal(out, x) and weights is None


def test_attention_module_has_grouped_key_value_projection():
    attention = CausalSelfAttention(small_config(n_head=4, n_kv_head=2))
    assert attention.query.weight.shape == (4 * 8, 32)
    assert attention.key_value.weight.shape == (2 * 2 * 8, 32)
    assert attention.out.weight.shape == (32, 4 * 8)


# ---------------------------------------------------------------------------------------------
# project and Projection: F.linear's result, by a transposed product for a few rows on a CPU

ALL_ROW_COUNTS = range(1, FEW_ROWS + 4)  # one row, the few-row path, and past it


@pytest.mark.parametrize("rows", ALL_ROW_COUNTS)
def test_project_equals_linear_for_two_dimensional_input(rows):
    x, weight = torch.randn(rows, 24), torch.randn(40, 24)
    out = project(x, weight)
    assert out.shape == (rows, 40) and out.is_contiguous()
    torch.testing.assert_close(out, F.linear(x, weight))


@pytest.mark.parametrize("batch, time", [(1, 1), (1, 2), (2, 3), (2, 4), (3, 3), (1, FEW_ROWS), (3, 4), (2, 8)])
def test_project_equals_linear_for_three_dimensional_input(batch, time):
    x, weight = torch.randn(batch, time, 24), torch.randn(40, 24)
    out = project(x, weight)
    assert out.shape == (batch, time, 40) and out.is_contiguous()
    torch.testing.assert_close(out, F.linear(x, weight))


@pytest.mark.parametrize("rows", ALL_ROW_COUNTS)
def test_project_equals_linear_for_non_contiguous_input(rows):
    weight = torch.randn(40, 24)
    transposed = torch.randn(24, rows).t()  # (rows, 24), columns adjacent in memory
    assert not transposed.is_contiguous() or rows == 1
    out = project(transposed, weight)
    assert out.shape == (rows, 40) and out.is_contiguous()
    torch.testing.assert_close(out, F.linear(transposed, weight))
    if rows % 2 == 0 and rows > 2:  # (batch, time, in) with batch and time swapped in memory
        permuted = torch.randn(rows // 2, 2, 24).transpose(0, 1)
        assert not permuted.is_contiguous()
        out = project(permuted, weight)
        assert out.shape == (2, rows // 2, 40) and out.is_contiguous()
        torch.testing.assert_close(out, F.linear(permuted, weight))
    strided = torch.randn(rows, 48)[:, ::2]  # the input dimension itself strided
    torch.testing.assert_close(project(strided, weight), F.linear(strided, weight))


def test_project_takes_the_transposed_product_for_two_to_few_rows_on_a_cpu(monkeypatch):
    # so the equality tests above do exercise the transposed product, not F.linear on both sides
    calls = []
    linear = F.linear
    monkeypatch.setattr(F, "linear", lambda *args: calls.append(args[0].shape[:-1].numel()) or linear(*args))
    weight = torch.randn(40, 24)
    for rows in ALL_ROW_COUNTS:
        project(torch.randn(rows, 24), weight)
    assert calls == [1] + list(range(FEW_ROWS + 1, FEW_ROWS + 4))


@pytest.mark.parametrize("shape", [(2, 24), (1, 3, 24), (2, 4, 24)])
def test_project_gradients_equal_linears(shape):
    x, weight = torch.randn(shape, requires_grad=True), torch.randn(40, 24, requires_grad=True)
    upstream = torch.randn(*shape[:-1], 40)
    x_grad, weight_grad = torch.autograd.grad((project(x, weight) * upstream).sum(), (x, weight))
    want_x_grad, want_weight_grad = torch.autograd.grad((F.linear(x, weight) * upstream).sum(), (x, weight))
    torch.testing.assert_close(x_grad, want_x_grad)
    torch.testing.assert_close(weight_grad, want_weight_grad)


@pytest.mark.parametrize("rows", [1, 3, FEW_ROWS + 2])
def test_projection_is_a_bias_free_linear_computing_linear_with_its_weight(rows):
    layer = Projection(24, 40)
    assert isinstance(layer, torch.nn.Linear)
    assert layer.bias is None and layer.weight.shape == (40, 24)
    assert list(layer.state_dict()) == ["weight"]
    x = torch.randn(rows, 24)
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight))
    # a plain bias-free nn.Linear's state dict loads into it, and back
    plain = torch.nn.Linear(24, 40, bias=False)
    layer.load_state_dict(plain.state_dict())
    assert torch.equal(layer.weight, plain.weight)
    torch.testing.assert_close(layer(x), plain(x))


def test_the_model_state_dict_keys_are_those_of_bias_free_linear_layers():
    model = small_model()
    keys = set(model.state_dict())
    for name in ("query", "key_value", "out"):
        assert f"blocks.0.attention.{name}.weight" in keys
    for name in ("gate", "up", "down"):
        assert f"blocks.1.mlp.{name}.weight" in keys
    assert not [key for key in keys if "bias" in key]
    projections = [module for module in model.modules() if isinstance(module, Projection)]
    assert len(projections) == 2 * 6  # every attention and MLP matrix of both layers


# ---------------------------------------------------------------------------------------------
# Forward pass


def test_forward_logits_shape_and_no_loss_without_targets():
    model = small_model()
    out = model(random_ids(3, 10))
    assert isinstance(out, ModelOutput)
    assert out.logits.shape == (3, 10, VOCAB)
    assert out.loss is None and out.attentions is None


def test_loss_equals_cross_entropy_of_the_logits():
    model = small_model()
    ids, targets = random_ids(2, 12), random_ids(2, 12, seed=5)
    out = model(ids, targets=targets)
    want = F.cross_entropy(out.logits.reshape(-1, VOCAB), targets.reshape(-1))
    assert out.loss.ndim == 0
    torch.testing.assert_close(out.loss, want)
    # the loss is a function of the logits at every position, not only the last
    manual = -torch.log_softmax(out.logits.double(), dim=-1).gather(-1, targets[..., None]).mean()
    assert out.loss.item() == pytest.approx(manual.item(), abs=1e-5)


@pytest.mark.parametrize("tie", [True, False])
def test_candidates_give_those_columns_of_the_logits_and_a_loss_over_them_only(tie):
    model = small_model(tie_embeddings=tie)
    ids, candidates = random_ids(2, 12), torch.tensor([5, 0, 96, 40])
    positions = random_ids(2, 12, vocab=4, seed=7)  # targets as positions in `candidates`
    full = model(ids).logits
    restricted = model(ids, targets=positions, candidates=candidates)
    torch.testing.assert_close(restricted.logits, full[..., candidates])
    want = F.cross_entropy(full[..., candidates].reshape(-1, 4), positions.reshape(-1))
    torch.testing.assert_close(restricted.loss, want)


@pytest.mark.parametrize("candidates, error, match", [
    (torch.tensor([1, 97]), ValueError, r"candidates must lie in \[0, 97\)"),
    (torch.tensor([[1, 2]]), ValueError, "candidates must be a non-empty 1-D tensor of token ids"),
    (torch.tensor([], dtype=torch.long), ValueError, "candidates must be a non-empty 1-D tensor of token ids"),
    (torch.tensor([1.0, 2.0]), TypeError, "must be an integer tensor"),
])
def test_bad_candidates_are_refused(candidates, error, match):
    with pytest.raises(error, match=match):
        small_model()(random_ids(1, 4), candidates=candidates)


def test_targets_must_be_positions_in_the_candidates():
    with pytest.raises(ValueError, match=r"targets \(positions in candidates\) must lie in \[0, 2\)"):
        small_model()(random_ids(1, 4), targets=random_ids(1, 4, vocab=5), candidates=torch.tensor([3, 4]))


@pytest.mark.parametrize("config", [preset("nano", context=32), small_config()], ids=["nano", "small"])
def test_fresh_model_loss_is_near_uniform(config):
    torch.manual_seed(0)
    model = GPT(config).eval()
    ids = random_ids(2, 32 if config.context >= 32 else 16, config.vocab_size)
    targets = random_ids(*ids.shape, config.vocab_size, seed=9)
    loss = model(ids, targets=targets).loss.item()
    assert abs(loss - math.log(config.vocab_size)) < 0.3


@pytest.mark.parametrize("n_kv_head", [4, 2, 1], ids=["mha", "gqa", "mqa"])
def test_attention_implementations_agree(n_kv_head):
    # T = 300 runs the chunked path over two 256-position blocks, exercising its online softmax
    model = small_model(context=320, n_kv_head=n_kv_head)
    ids = random_ids(2, 300)
    with torch.no_grad():
        logits = {impl: model(ids, attention_impl=impl).logits for impl in IMPLS}
    torch.testing.assert_close(logits["explicit"], logits["sdpa"], rtol=0, atol=1e-5)
    torch.testing.assert_close(logits["chunked"], logits["sdpa"], rtol=0, atol=1e-5)


@pytest.mark.parametrize("chunk", [1, 7, 64, 1024])
def test_the_chunked_path_uses_the_configured_block_and_agrees_with_sdpa(chunk, monkeypatch):
    model = small_model(context=320, attention_chunk=chunk)
    ids = random_ids(2, 100)
    seen = []
    real = minigpt.model.chunked_attention
    monkeypatch.setattr(minigpt.model, "chunked_attention", lambda *a, **kw: seen.append(kw) or real(*a, **kw))
    with torch.no_grad():
        chunked, sdpa = (model(ids, attention_impl=impl).logits for impl in ("chunked", "sdpa"))
    assert seen and all(kw["chunk_size"] == chunk for kw in seen)
    torch.testing.assert_close(chunked, sdpa, rtol=0, atol=1e-5)


def test_return_attention_gives_causal_probabilities_per_layer():
    model = small_model(n_layer=3)
    ids = random_ids(2, 9)
    with torch.no_grad():
        plain = model(ids).logits
        out = model(ids, return_attention=True)
    assert len(out.attentions) == 3
    mask_above = torch.ones(9, 9, dtype=torch.bool).triu(diagonal=1)
    for weights in out.attentions:
        assert weights.shape == (2, 4, 9, 9)
        torch.testing.assert_close(weights.sum(dim=-1), torch.ones(2, 4, 9), rtol=0, atol=1e-6)
        assert torch.all(weights[..., mask_above] == 0)
        assert torch.all(weights[..., ~mask_above] > 0)
        assert torch.all(weights[..., 0, 0] == 1)  # the first position can only look at itself
    torch.testing.assert_close(out.logits, plain, rtol=0, atol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("t", [0, 5, 11])
def test_changing_a_token_never_changes_earlier_logits(impl, t):
    model = small_model()
    ids = random_ids(2, 12)
    changed = ids.clone()
    changed[:, t] = (changed[:, t] + 1 + torch.arange(2)) % VOCAB
    with torch.no_grad():
        before = model(ids, attention_impl=impl).logits
        after = model(changed, attention_impl=impl).logits
    torch.testing.assert_close(after[:, :t], before[:, :t], rtol=0, atol=1e-6)
    assert (after[:, t:] - before[:, t:]).abs().amax(dim=-1).min() > 1e-5  # the change is seen from t on


# ---------------------------------------------------------------------------------------------
# KV cache


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("n_kv_head", [4, 2, 1], ids=["mha", "gqa", "mqa"])
def test_prefill_then_token_by_token_decoding_matches_full_forward(n_kv_head, impl):
    model = small_model(n_kv_head=n_kv_head)
    ids = random_ids(2, 14)
    with torch.no_grad():
        full = model(ids, attention_impl=impl).logits
        cache = model.new_kv_cache(2)
        pieces = [model(ids[:, :5], kv_cache=cache, attention_impl=impl).logits]
        for t in range(5, 14):
            pieces.append(model(ids[:, t : t + 1], kv_cache=cache, attention_impl=impl).logits)
            assert len(cache) == t + 1
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=0, atol=1e-5)


@pytest.mark.parametrize("n_kv_head", [4, 2, 1], ids=["mha", "gqa", "mqa"])
def test_prefill_in_two_chunks_then_decode_matches_full_forward(n_kv_head):
    model = small_model(n_kv_head=n_kv_head)
    ids = random_ids(3, 16)
    with torch.no_grad():
        full = model(ids).logits
        cache = model.new_kv_cache(3)
        pieces = [model(ids[:, :3], kv_cache=cache).logits, model(ids[:, 3:10], kv_cache=cache).logits]
        pieces += [model(ids[:, t : t + 1], kv_cache=cache).logits for t in range(10, 16)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=0, atol=1e-5)


def test_cache_attention_weights_have_past_plus_new_columns():
    model = small_model()
    ids = random_ids(2, 12)
    with torch.no_grad():
        full = model(ids, return_attention=True).attentions
        cache = model.new_kv_cache(2)
        first = model(ids[:, :4], kv_cache=cache, return_attention=True).attentions
        chunk = model(ids[:, 4:7], kv_cache=cache, return_attention=True).attentions
        step = model(ids[:, 7:8], kv_cache=cache, return_attention=True).attentions
    for layer in range(2):
        assert first[layer].shape == (2, 4, 4, 4)
        assert chunk[layer].shape == (2, 4, 3, 7)
        assert step[layer].shape == (2, 4, 1, 8)
        # the rows are those of the full attention matrix, cut at the keys seen so far
        torch.testing.assert_close(chunk[layer], full[layer][:, :, 4:7, :7], rtol=0, atol=1e-6)
        torch.testing.assert_close(step[layer], full[layer][:, :, 7:8, :8], rtol=0, atol=1e-6)


def test_new_kv_cache_is_sized_for_the_model():
    model = small_model(n_kv_head=2)
    cache = model.new_kv_cache(3)
    assert len(cache) == 0
    assert cache.max_len == CONTEXT
    assert cache.k.shape == (2, 3, 2, CONTEXT, 8)
    assert model.new_kv_cache(1, max_len=10).max_len == 10


@pytest.mark.parametrize("length", range(2, FEW_ROWS + 1))
def test_a_few_positions_in_one_pass_match_them_one_at_a_time_through_the_cache(length):
    # the few-row `project` path (a short prompt; speculative decoding's verify pass after a cached
    # prefix) against single-row steps: so verification scores what plain decoding would
    model = small_model()
    ids = random_ids(1, 4 + length)
    with torch.no_grad():
        cache = model.new_kv_cache(1)
        steps = torch.cat([model(ids[:, t : t + 1], kv_cache=cache).logits for t in range(4 + length)], dim=1)
        prompt = model(ids[:, :length]).logits
        cache = model.new_kv_cache(1)
        model(ids[:, :4], kv_cache=cache)
        verify = model(ids[:, 4:], kv_cache=cache).logits
    assert prompt.shape == verify.shape == (1, length, VOCAB)
    torch.testing.assert_close(prompt, steps[:, :length], rtol=0, atol=1e-5)
    torch.testing.assert_close(verify, steps[:, 4:], rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# The embedding splice point


def test_forward_embeddings_of_embed_equals_forward():
    model = small_model()
    ids, targets = random_ids(2, 10), random_ids(2, 10, seed=3)
    with torch.no_grad():
        via_ids = model(ids, targets=targets)
        embeddings = model.embed(ids)
        via_embeddings = model.forward_embeddings(embeddings, targets=targets)
    assert embeddings.shape == (2, 10, 32)
    assert torch.equal(embeddings, model.token_embedding.weight[ids])
    torch.testing.assert_close(via_embeddings.logits, via_ids.logits, rtol=0, atol=0)
    torch.testing.assert_close(via_embeddings.loss, via_ids.loss, rtol=0, atol=0)


def test_forward_embeddings_uses_the_given_vectors_and_a_cache():
    model = small_model()
    ids = random_ids(1, 8)
    with torch.no_grad():
        x = model.embed(ids)
        spliced = x.clone()
        spliced[:, 3:5] = torch.randn(1, 2, 32) * 0.02  # e.g. image embeddings in the middle
        a = model.forward_embeddings(spliced).logits
        assert not torch.allclose(a[:, 3:], model(ids).logits[:, 3:], atol=1e-4)
        torch.testing.assert_close(a[:, :3], model(ids).logits[:, :3], rtol=0, atol=1e-6)
        cache = model.new_kv_cache(1)
        b = torch.cat(
            [model.forward_embeddings(spliced[:, :5], kv_cache=cache).logits,
             model.forward_embeddings(spliced[:, 5:], kv_cache=cache).logits], dim=1
        )
    torch.testing.assert_close(b, a, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Training sanity and determinism


def test_tiny_model_overfits_a_fixed_batch():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=32, context=16, n_layer=2, n_head=2, n_kv_head=1, n_embd=32))
    ids = random_ids(4, 16, vocab=32, seed=11)
    targets = random_ids(4, 16, vocab=32, seed=12)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    first = None
    for _ in range(100):
        loss = model(ids, targets=targets).loss
        first = loss.item() if first is None else first
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    final = model(ids, targets=targets).loss.item()
    assert final < first / 2, (first, final)


def test_same_seed_gives_same_initial_weights():
    config = small_config()
    torch.manual_seed(42)
    a = GPT(config)
    torch.manual_seed(42)
    b = GPT(config)
    torch.manual_seed(43)
    c = GPT(config)
    for name, tensor in a.state_dict().items():
        assert torch.equal(tensor, b.state_dict()[name]), name
    assert not torch.equal(a.token_embedding.weight, c.token_embedding.weight)
    ids = random_ids(1, 6)
    assert torch.equal(a(ids).logits, b(ids).logits)


def test_residual_projections_start_smaller():
    model = GPT(small_config(n_layer=8))
    std = 0.02 / math.sqrt(16)
    assert model.blocks[0].attention.out.weight.std().item() == pytest.approx(std, rel=0.15)
    assert model.blocks[0].mlp.down.weight.std().item() == pytest.approx(std, rel=0.15)
    assert model.blocks[0].attention.query.weight.std().item() == pytest.approx(0.02, rel=0.15)


# ---------------------------------------------------------------------------------------------
# Bad inputs


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return GPT(small_config()).eval()


def test_float_ids_are_a_type_error(model):
    with pytest.raises(TypeError, match=r"token ids must be an integer tensor.*float32"):
        model(torch.zeros(1, 4))
    with pytest.raises(TypeError, match=r"integer tensor"):
        model([[1, 2, 3]])


@pytest.mark.parametrize("bad", [VOCAB, VOCAB + 50, -1])
def test_ids_outside_the_vocabulary_name_the_range(model, bad):
    ids = random_ids(1, 5)
    ids[0, 2] = bad
    with pytest.raises(ValueError, match=rf"token ids must lie in \[0, {VOCAB}\)"):
        model(ids)


@pytest.mark.parametrize("low, high", [(-3, VOCAB + 5), (0, VOCAB), (-1, VOCAB - 1), (-7, -2)])
def test_ids_outside_the_vocabulary_report_their_smallest_and_largest_values(low, high):
    ids = random_ids(2, 6, vocab=VOCAB - 10) + 5  # all in 5 .. VOCAB - 6
    ids[1, 3], ids[0, 0] = low, high
    if high < 0:
        ids = ids.clamp(max=high)
    with pytest.raises(ValueError, match=rf"token ids must lie in \[0, {VOCAB}\), found values from {low} to {high}$"):
        minigpt.model._check_ids(ids, VOCAB)


def test_check_ids_accepts_ids_in_range_and_an_empty_sequence():
    assert minigpt.model._check_ids(torch.tensor([[0, VOCAB - 1]]), VOCAB) is None
    assert minigpt.model._check_ids(torch.zeros(1, 0, dtype=torch.long), VOCAB) is None
    assert minigpt.model._check_ids(torch.zeros(3, 0, dtype=torch.int32), VOCAB) is None


@pytest.mark.parametrize("shape", [(5,), (1, 2, 5)])
def test_ids_must_be_two_dimensional(model, shape):
    with pytest.raises(ValueError, match=r"shape \(batch, time\)"):
        model(torch.zeros(shape, dtype=torch.long))


def test_sequence_longer_than_context_is_refused(model):
    with pytest.raises(ValueError, match=rf"exceed the model's context of {CONTEXT}"):
        model(random_ids(1, CONTEXT + 1))
    with pytest.raises(ValueError, match=r"context"):
        model.forward_embeddings(torch.zeros(1, CONTEXT + 1, 32))
    assert model(random_ids(1, CONTEXT)).logits.shape == (1, CONTEXT, VOCAB)  # exactly full is fine


def test_decoding_past_the_context_through_the_cache_is_refused(model):
    cache = model.new_kv_cache(1)
    ids = random_ids(1, CONTEXT)
    with torch.no_grad():
        model(ids[:, :20], kv_cache=cache)
        for t in range(20, CONTEXT):
            model(ids[:, t : t + 1], kv_cache=cache)
        assert len(cache) == CONTEXT
        with pytest.raises(ValueError, match=rf"{CONTEXT} cached \+ 1 new tokens exceed the model's context"):
            model(ids[:, :1], kv_cache=cache)
    assert cache.lengths == [CONTEXT] * 2  # the refusal left the cache as it was

    fresh = model.new_kv_cache(1)
    model(ids[:, :20], kv_cache=fresh)
    with pytest.raises(ValueError, match=r"20 cached \+ 5 new tokens exceed .*context"):
        model(random_ids(1, 5), kv_cache=fresh)
    assert fresh.lengths == [20, 20]


def test_unknown_preset_lists_the_choices():
    with pytest.raises(ValueError, match=r"unknown preset 'huge'.*'nano', 'mini', 'full'"):
        preset("huge")


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(n_embd=30, n_head=4), r"n_embd \(30\) must be a multiple of n_head \(4\)"),
        (dict(n_head=4, n_kv_head=3), r"n_kv_head \(3\) must divide n_head \(4\)"),
        (dict(n_head=4, n_kv_head=8), r"n_kv_head \(8\) must divide n_head \(4\)"),
        (dict(n_embd=12, n_head=4), r"head_dim \(3\) must be even"),
        (dict(vocab_size=0), r"vocab_size must be a positive integer, got 0"),
        (dict(context=-1), r"context must be a positive integer, got -1"),
        (dict(n_layer=0), r"n_layer must be a positive integer"),
        (dict(n_head=0), r"n_head must be a positive integer"),
        (dict(n_kv_head=0), r"n_kv_head must be a positive integer"),
        (dict(n_embd=-32), r"n_embd must be a positive integer"),
        (dict(n_embd=32.0), r"n_embd must be a positive integer, got 32.0"),
        (dict(attention_chunk=0), r"attention_chunk must be a positive integer, got 0"),
    ],
)
def test_invalid_configs_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        small_config(**overrides)


def test_invalid_preset_overrides_are_refused():
    with pytest.raises(ValueError, match=r"n_kv_head \(3\) must divide n_head \(4\)"):
        preset("nano", n_kv_head=3)


def test_rope_base_not_above_one_is_refused():
    with pytest.raises(ValueError, match=r"base must be greater than 1"):
        GPT(small_config(rope_base=1.0))


def test_negative_mlp_width_is_refused():
    with pytest.raises(ValueError, match=r"mlp_hidden"):
        small_config(mlp_hidden=-32)


def test_unknown_attention_impl_is_refused(model):
    with pytest.raises(ValueError, match=r"unknown attention impl 'flash'.*'sdpa', 'explicit' or 'chunked'"):
        model(random_ids(1, 4), attention_impl="flash")


def test_unknown_attention_impl_is_refused_with_return_attention(model):
    with pytest.raises(ValueError, match=r"unknown attention impl"):
        model(random_ids(1, 4), return_attention=True, attention_impl="flash")


def test_refused_attention_impl_leaves_the_cache_untouched(model):
    ids = random_ids(1, 6)
    cache = model.new_kv_cache(1)
    with pytest.raises(ValueError, match=r"unknown attention impl"):
        model(ids[:, :3], kv_cache=cache, attention_impl="flash")
    assert cache.lengths == [0, 0]
    with torch.no_grad():
        cached = torch.cat([model(ids[:, :3], kv_cache=cache).logits, model(ids[:, 3:], kv_cache=cache).logits], 1)
    torch.testing.assert_close(cached, model(ids).logits, rtol=0, atol=1e-5)


def test_targets_outside_the_vocabulary_are_refused(model):
    ids = random_ids(1, 5)
    for bad in (VOCAB, -1):
        targets = random_ids(1, 5, seed=4)
        targets[0, -1] = bad
        with pytest.raises(ValueError, match=rf"targets must lie in \[0, {VOCAB}\)"):
            model(ids, targets=targets)
    with pytest.raises(TypeError, match=r"targets must be an integer tensor"):
        model(ids, targets=torch.zeros(1, 5))


def test_ignored_targets_leave_the_loss_to_the_rest(model):
    ids, targets = random_ids(2, 6), random_ids(2, 6, seed=5)
    masked = targets.clone()
    masked[:, :4] = IGNORE_TARGET
    logits = model(ids).logits
    expected = torch.nn.functional.cross_entropy(logits[:, 4:].flatten(0, 1), targets[:, 4:].flatten())
    torch.testing.assert_close(model(ids, targets=masked).loss, expected)
    masked[0, 5] = -2  # any other negative id is still an error
    with pytest.raises(ValueError, match=rf"targets must lie in \[0, {VOCAB}\)"):
        model(ids, targets=masked)


def test_int32_ids_work_like_int64(model):
    ids = random_ids(2, 6)
    with torch.no_grad():
        torch.testing.assert_close(model(ids.int()).logits, model(ids).logits, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.int16, torch.uint8])
def test_small_integer_ids_work_or_are_a_clear_type_error(model, dtype):
    ids = random_ids(2, 6)
    try:
        logits = model(ids.to(dtype)).logits
    except TypeError:
        return  # refusing them up front, with a TypeError, is fine too
    torch.testing.assert_close(logits, model(ids).logits, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# Generation


def test_greedy_generation_with_and_without_the_cache_agree(model):
    prompt = random_ids(2, 5)
    cached = model.generate(prompt, 12)
    recomputed = model.generate(prompt, 12, use_cache=False)
    assert cached.shape == (2, 17) and torch.equal(cached[:, :5], prompt)
    assert torch.equal(cached, recomputed)
    # greedy means: each new token is the argmax of the model's logits for the sequence so far
    with torch.no_grad():
        assert torch.equal(cached[:, 5], model(prompt).logits[:, -1].argmax(-1))


def test_sampling_is_reproducible_with_a_generator_and_varies_without(model):
    prompt = random_ids(1, 4)
    first = model.generate(prompt, 15, temperature=1.5, generator=torch.Generator().manual_seed(3))
    again = model.generate(prompt, 15, temperature=1.5, generator=torch.Generator().manual_seed(3))
    other = model.generate(prompt, 15, temperature=1.5, generator=torch.Generator().manual_seed(4))
    assert torch.equal(first, again) and not torch.equal(first, other)


@pytest.mark.parametrize("temperature", [-0.1, float("nan"), 1000.0, "hot"])
def test_bad_temperature_is_refused(model, temperature):
    with pytest.raises(ValueError, match="temperature must be a number from 0"):
        model.generate(random_ids(1, 3), 2, temperature=temperature)


def test_generation_beyond_the_context_is_refused(model):
    with pytest.raises(ValueError, match=rf"plus 5 new tokens exceeds the model's context of {CONTEXT}"):
        model.generate(random_ids(1, CONTEXT - 4), 5)
    with pytest.raises(ValueError, match="max_new_tokens must be a non-negative integer"):
        model.generate(random_ids(1, 3), -1)


# ---------------------------------------------------------------------------------------------
# Positional scaling in the config (the schemes themselves: tests/test_positions.py)


def test_default_config_uses_plain_rope():
    config = small_config()
    assert config.rope == RopeScaling()
    assert small_model().rotary.scaling == RopeScaling()


@pytest.mark.parametrize("scheme", ["linear", "ntk", "dynamic-ntk", "yarn"])
def test_every_scheme_at_factor_one_gives_the_plain_model(scheme):
    ids = random_ids(2, CONTEXT)
    plain = small_model()
    scaled = small_model(rope_scaling=scheme, rope_factor=1.0, rope_original_context=CONTEXT)
    with torch.no_grad():
        torch.testing.assert_close(scaled(ids).logits, plain(ids).logits, rtol=0, atol=1e-6)


@pytest.mark.parametrize("scheme", ["linear", "ntk", "yarn"])
def test_a_scaled_model_reads_past_its_training_length_with_the_same_weights(scheme):
    plain = small_model()
    stretched = GPT(small_config(context=4 * CONTEXT, rope_scaling=scheme, rope_factor=4.0,
                                 rope_original_context=CONTEXT)).eval()
    stretched.load_state_dict(plain.state_dict())  # positions add no weights: any checkpoint loads
    ids = random_ids(1, 4 * CONTEXT)
    with torch.no_grad():
        logits = stretched(ids).logits
        short = stretched(ids[:, :CONTEXT]).logits
        assert logits.shape == (1, 4 * CONTEXT, VOCAB)
        # The scheme changes the angles, so the outputs differ from the plain model's even in range.
        assert not torch.allclose(short, plain(ids[:, :CONTEXT]).logits, atol=1e-4)


def test_linear_interpolation_is_plain_rope_on_stretched_positions():
    """Under PI with factor s, attention between positions s*p and s*q scores like p and q did."""
    plain = small_model()
    stretched = small_model(rope_scaling="linear", rope_factor=2.0, rope_original_context=CONTEXT, context=2 * CONTEXT)
    cos_plain, sin_plain = plain.rotary(0, CONTEXT)
    cos_pi, sin_pi = stretched.rotary(0, 2 * CONTEXT)
    torch.testing.assert_close(cos_pi[::2], cos_plain, rtol=0, atol=1e-6)
    torch.testing.assert_close(sin_pi[::2], sin_plain, rtol=0, atol=1e-6)


@torch.no_grad()
def cached_decoding_logits(model: GPT, ids: torch.Tensor, prefill: int) -> torch.Tensor:
    """Logits `(B, T, vocab)` from prefilling `ids[:, :prefill]` into a KV cache, then one token at a time."""
    cache = model.new_kv_cache(ids.shape[0])
    pieces = [model(ids[:, :prefill], kv_cache=cache).logits]
    pieces += [model(ids[:, t : t + 1], kv_cache=cache).logits for t in range(prefill, ids.shape[1])]
    return torch.cat(pieces, dim=1)


@pytest.mark.parametrize("scheme", ["linear", "ntk", "yarn"])
def test_kv_cache_decoding_matches_the_full_forward_under_a_static_scheme(scheme):
    model = small_model(rope_scaling=scheme, rope_factor=4.0, rope_original_context=8)
    ids = random_ids(2, CONTEXT)
    with torch.no_grad():
        full = model(ids).logits
    torch.testing.assert_close(cached_decoding_logits(model, ids, prefill=4), full, rtol=0, atol=1e-5)


def test_dynamic_ntk_with_a_kv_cache_drifts_from_the_full_forward_past_the_training_length():
    """The pitfall: cached keys keep the base of the step that stored them, a recompute does not."""
    original = 8
    model = small_model(rope_scaling="dynamic-ntk", rope_factor=4.0, rope_original_context=original)
    ids = random_ids(1, CONTEXT)
    with torch.no_grad():
        full = model(ids).logits
        prefix = model(ids[:, :original]).logits
    cached = cached_decoding_logits(model, ids, prefill=1)
    # Up to the training length the base is plain: the cache agrees with a recompute of that prefix.
    torch.testing.assert_close(cached[:, :original], prefix, rtol=0, atol=1e-5)
    # A recompute of the whole sequence uses the stretched base at every position, which the keys
    # cached at earlier steps never had: the two disagree far beyond float rounding.
    assert (cached - full).abs().amax() > 100 * (cached[:, :original] - prefix).abs().amax()
    assert (cached - full).abs().amax() > 1e-5


def test_generate_with_the_cache_equals_a_recompute_under_dynamic_ntk_past_the_training_length():
    """generate never decodes with stale keys: past the original context it recomputes."""
    model = small_model(rope_scaling="dynamic-ntk", rope_factor=4.0, rope_original_context=8)
    prompt = random_ids(2, 5)
    for temperature in (0.0, 1.0):
        cached = model.generate(prompt, CONTEXT - 5, temperature, use_cache=True,
                                generator=torch.Generator().manual_seed(0))
        recomputed = model.generate(prompt, CONTEXT - 5, temperature, use_cache=False,
                                    generator=torch.Generator().manual_seed(0))
        assert torch.equal(cached, recomputed)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(rope_scaling="alibi"), "unknown RoPE scaling scheme 'alibi'"),
        (dict(rope_scaling="yarn", rope_factor=0.5, rope_original_context=8), "scale factor must be >= 1"),
        (dict(rope_scaling="yarn", rope_factor=4.0), "needs original_context"),
    ],
)
def test_bad_rope_scaling_in_the_config_is_refused_at_once(overrides, message):
    with pytest.raises(ValueError, match=message):
        small_config(**overrides)


def test_the_context_error_points_to_scaling(model):
    with pytest.raises(ValueError, match="RoPE scaling scheme"):
        model(random_ids(1, CONTEXT + 1))


def test_a_config_saved_before_scaling_existed_still_loads():
    old = {k: v for k, v in vars(small_config()).items() if not k.startswith("rope_") or k == "rope_base"}
    assert GPTConfig(**old).rope == RopeScaling()


def test_last_only_gives_the_last_position_of_the_full_logits():
    model = small_model()
    ids = random_ids(2, 10)
    with torch.no_grad():
        full = model(ids).logits
        last = model(ids, last_only=True).logits
        cache = model.new_kv_cache(2)
        prefill = model(ids, kv_cache=cache, last_only=True).logits
    assert last.shape == (2, 1, VOCAB)
    torch.testing.assert_close(last, full[:, -1:], rtol=0, atol=1e-6)
    torch.testing.assert_close(prefill, full[:, -1:], rtol=0, atol=1e-5)
    assert len(cache) == 10  # every position still enters the cache


def test_last_only_refuses_targets():
    model = small_model()
    with pytest.raises(ValueError, match="last_only gives only the last"):
        model(random_ids(1, 5), random_ids(1, 5), last_only=True)


# ---------------------------------------------------------------------------------------------
# residual_stream: the blocks alone, before the final norm and the output layer


def test_residual_stream_then_norm_and_head_gives_the_forward_logits():
    model = small_model()
    ids = random_ids(2, 12)
    with torch.no_grad():
        hidden, attentions = model.residual_stream(model.embed(ids))
        logits = model.lm_head(model.final_norm(hidden))
        forward = model(ids).logits
    assert hidden.shape == (2, 12, model.config.n_embd)
    assert attentions == [None] * model.config.n_layer
    assert torch.equal(logits, forward)


@pytest.mark.parametrize("impl", IMPLS)
def test_residual_stream_attention_weights_and_impls_match_the_forward(impl):
    model = small_model()
    ids = random_ids(1, 10)
    with torch.no_grad():
        hidden, attentions = model.residual_stream(model.embed(ids), return_attention=True, attention_impl=impl)
        forward = model(ids, return_attention=True, attention_impl=impl)
        plain, _ = model.residual_stream(model.embed(ids))
    assert len(attentions) == model.config.n_layer
    for mine, theirs in zip(attentions, forward.attentions):
        assert mine.shape == (1, model.config.n_head, 10, 10) and torch.equal(mine, theirs)
    torch.testing.assert_close(model.lm_head(model.final_norm(hidden)), forward.logits, rtol=0, atol=1e-6)
    torch.testing.assert_close(hidden, plain, rtol=0, atol=1e-5)


def test_residual_stream_with_a_kv_cache_continues_the_full_stream():
    model = small_model()
    ids = random_ids(2, 14)
    with torch.no_grad():
        full, _ = model.residual_stream(model.embed(ids))
        cache = model.new_kv_cache(2)
        first, _ = model.residual_stream(model.embed(ids[:, :9]), kv_cache=cache)
        second, _ = model.residual_stream(model.embed(ids[:, 9:]), kv_cache=cache)
    assert len(cache) == 14
    torch.testing.assert_close(torch.cat([first, second], dim=1), full, rtol=0, atol=1e-5)


def test_residual_stream_is_causal_and_takes_any_input_vectors():
    model = small_model()
    x = torch.randn(1, 8, model.config.n_embd)
    changed = x.clone()
    changed[:, 5:] += 1.0
    with torch.no_grad():
        before, _ = model.residual_stream(x)
        after, _ = model.residual_stream(changed)
    torch.testing.assert_close(before[:, :5], after[:, :5], rtol=0, atol=1e-6)  # earlier positions never see later ones
    assert not torch.allclose(before[:, 5:], after[:, 5:])


def test_residual_stream_refuses_an_unknown_impl_and_too_long_an_input():
    model = small_model()
    with pytest.raises(ValueError, match="unknown attention impl 'flash'"):
        model.residual_stream(torch.randn(1, 4, model.config.n_embd), attention_impl="flash")
    with pytest.raises(ValueError, match=f"0 cached \\+ {CONTEXT + 1} new tokens exceed the model's context of {CONTEXT}"):
        model.residual_stream(torch.randn(1, CONTEXT + 1, model.config.n_embd))
    cache = model.new_kv_cache(1)
    model.residual_stream(torch.randn(1, CONTEXT - 2, model.config.n_embd), kv_cache=cache)
    with pytest.raises(ValueError, match=f"{CONTEXT - 2} cached \\+ 3 new tokens exceed"):
        model.residual_stream(torch.randn(1, 3, model.config.n_embd), kv_cache=cache)
