"""Tests for minigpt/train.py: schedule, batches, bits per byte, checkpoints, resume, and DDP."""

import math
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from minigpt.model import GPT, GPTConfig
from minigpt.train import (
    TrainConfig,
    bits_per_byte,
    corpus_tokens,
    learning_rate,
    load_checkpoint,
    load_tokenizer,
    sample_batch,
    token_byte_lengths,
    train,
)

# A small, fast run: the nano preset with a short context, a few steps, no periodic evaluation.
TINY = TrainConfig(preset="nano", steps=4, batch_size=4, warmup_steps=10, eval_every=1000,
                   model_overrides={"context": 32})


def test_learning_rate_warms_up_then_decays_to_the_minimum():
    config = TrainConfig(steps=1000, warmup_steps=100, learning_rate=1e-3, min_learning_rate=1e-4)
    assert learning_rate(0, config) == pytest.approx(1e-5)
    assert learning_rate(99, config) == pytest.approx(1e-3)
    halfway = 100 + (1000 - 100) // 2
    assert learning_rate(halfway, config) == pytest.approx((1e-3 + 1e-4) / 2)
    assert learning_rate(1000, config) == pytest.approx(1e-4)
    rates = [learning_rate(s, config) for s in range(100, 1001)]
    assert all(a >= b for a, b in zip(rates, rates[1:]))


def test_sample_batch_targets_are_inputs_shifted_by_one():
    tokens = torch.arange(1000)
    x, y = sample_batch(tokens, 8, 16, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (8, 16)
    assert torch.equal(y[:, :-1], x[:, 1:]) and torch.equal(y, x + 1)
    again, _ = sample_batch(tokens, 8, 16, torch.Generator().manual_seed(0))
    assert torch.equal(x, again)


def test_bits_per_byte_equals_a_direct_computation():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50, context=8, n_layer=1, n_head=2, n_kv_head=1, n_embd=16)).eval()
    tokens = torch.randint(0, 50, (8 * 5 + 1,))
    lengths = torch.randint(1, 5, (50,))
    x = tokens[:-1].view(5, 8)
    y = tokens[1:].view(5, 8)
    with torch.no_grad():
        nats = F.cross_entropy(model(x).logits.flatten(0, 1), y.flatten(), reduction="sum").item()
    expected = nats / math.log(2) / lengths[y].sum().item()
    assert bits_per_byte(model, tokens, lengths) == pytest.approx(expected, rel=1e-6)
    assert bits_per_byte(model, tokens, lengths, max_windows=2) != pytest.approx(expected, rel=1e-6)


def test_token_byte_lengths_and_corpus_tokens_agree_with_the_text():
    tokenizer = load_tokenizer("minigpt-8k")
    lengths = token_byte_lengths(tokenizer)
    val = corpus_tokens("val")
    from minigpt.data import shakespeare_text

    assert lengths[val].sum().item() == len(shakespeare_text("val").encode("utf-8"))
    assert lengths[tokenizer.special_tokens["<|endoftext|>"]] == len(b"<|endoftext|>")


def test_checkpoint_round_trip(tmp_path):
    model, history = train(TINY, out=tmp_path / "nano.pt", progress=False)
    loaded, checkpoint = load_checkpoint(tmp_path / "nano.pt")
    assert loaded.config == model.config and loaded.config.tokenizer == "minigpt-8k"
    assert checkpoint["step"] == TINY.steps and "optimizer" in checkpoint
    x = torch.randint(0, model.config.vocab_size, (2, 16))
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, model(x).logits)
    assert len(history["val_bpb"]) == 1 and 0 < history["val_bpb"][0] < 20


def test_resume_continues_exactly(tmp_path):
    # Warmup covers every step here, so the 2-step run's schedule is a prefix of the 4-step one.
    straight, _ = train(TINY, progress=False)
    train(replace(TINY, steps=2), out=tmp_path / "half.pt", progress=False)
    resumed, history = train(TINY, resume=tmp_path / "half.pt", progress=False)
    assert history["step"] == [1, 2, 3, 4]
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), name


def test_corrupt_or_missing_checkpoint_gives_a_clear_error(tmp_path):
    train(TINY, out=tmp_path / "good.pt", progress=False)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes((tmp_path / "good.pt").read_bytes()[:2000])
    with pytest.raises(ValueError, match="not a readable minigpt checkpoint"):
        load_checkpoint(truncated)
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "absent.pt")


def test_batch_size_must_split_across_processes(monkeypatch):
    monkeypatch.setattr("minigpt.train._distributed", lambda: (0, 3))
    with pytest.raises(ValueError, match=r"batch_size \(4\) must be divisible by the number of processes \(3\)"):
        train(TINY, progress=False)


def test_unknown_preset_is_refused():
    with pytest.raises(ValueError, match="unknown preset 'medium'"):
        train(replace(TINY, preset="medium"), progress=False)


def test_ddp_with_two_processes_equals_one_process(tmp_path):
    """torchrun with 2 CPU processes (gloo) takes the same steps as one process on the same global batch."""
    out = tmp_path / "ddp.pt"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517",
        "-m", "minigpt.train", "--preset", "nano", "--steps", "4", "--batch-size", "4",
        "--warmup-steps", "10", "--eval-every", "1000", "--out", str(out),
    ]
    # The model override (context 32) has no flag, so the DDP run uses the preset's context: build
    # the single-process reference the same way.
    single, _ = train(replace(TINY, model_overrides={}), progress=False)
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ddp, _ = load_checkpoint(out)
    for (name, a), b in zip(single.state_dict().items(), ddp.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-5), name


def test_resume_refuses_a_checkpoint_of_another_shape(tmp_path):
    train(TINY, out=tmp_path / "nano.pt", progress=False)
    with pytest.raises(ValueError, match="holds a model of config"):
        train(replace(TINY, model_overrides={"context": 64}), resume=tmp_path / "nano.pt", progress=False)
