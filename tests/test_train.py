"""Tests for minigpt/train.py: schedule, batches, bits per byte, checkpoints (and their precision), resume,\nthe step callback, the command line, and DDP."""

import json
import math
import random
import subprocess
import sys
from pathlib import Path
from dataclasses import asdict, replace

import pytest
import torch
import torch.nn.functional as F

from minigpt import data
from minigpt.model import IGNORE_TARGET, GPT, GPTConfig
from minigpt.positions import RotaryEmbedding
import minigpt.train
from minigpt.train import (
    SAVE_DTYPES,
    CheckpointError,
    SkippedRotary,
    TrainConfig,
    bits_per_byte,
    corpus_tokens,
    learning_rate,
    load_checkpoint,
    load_tokenizer,
    main,
    most_common_tokens,
    positions_skipped,
    probe_rows,
    probe_size_limits,
    probe_window,
    retrain_arguments,
    retrain_command,
    sample_batch,
    training_batch,
    save_checkpoint,
    token_byte_lengths,
    train,
    training_device,
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


class RunsCode:
    """What a malicious pickle holds: unpickling it calls a function of the file's choosing."""

    def __reduce__(self):
        return (print, ("this ran while loading",))


def refused_files(tmp_path):
    """Files `load_checkpoint` must refuse, each with the words its one-line reason must contain."""
    torch.save({"model": RunsCode(), "model_config": {}}, tmp_path / "code.pt")
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint at all")
    torch.save({"weights": {}}, tmp_path / "foreign.pt")
    good = tmp_path / "good.pt"
    train(TINY, out=good, progress=False)
    (tmp_path / "truncated.pt").write_bytes(good.read_bytes()[:2000])
    return {"code.pt": "could run code", "garbage.pt": "not a PyTorch checkpoint archive",
            "foreign.pt": "not written by minigpt.train", "truncated.pt": "incomplete or corrupt"}


def test_refused_checkpoints_say_why_in_one_line_and_never_suggest_loading_unsafely(tmp_path, capsys):
    for name, reason in refused_files(tmp_path).items():
        with pytest.raises(CheckpointError) as error:
            load_checkpoint(tmp_path / name)
        message = str(error.value)
        assert message.startswith(f"{tmp_path / name} is not a readable minigpt checkpoint: ") and reason in message
        assert "\n" not in message and "weights_only" not in message and "False" not in message
    assert "this ran while loading" not in capsys.readouterr().out


def test_command_line_ends_on_a_refused_checkpoint_with_one_line(tmp_path, capsys):
    refused_files(tmp_path)
    for flag in ("--init-from", "--resume"):
        with pytest.raises(SystemExit) as exit_info:
            main(cli_args(tmp_path / "x.pt", flag, str(tmp_path / "code.pt")))
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err and "weights_only" not in err
        assert err.startswith(f"python -m minigpt.train: error: {tmp_path / 'code.pt'} is not a readable")
    with pytest.raises(SystemExit):
        main(cli_args(tmp_path / "x.pt", "--init-from", str(tmp_path / "absent.pt")))
    assert capsys.readouterr().err == f"python -m minigpt.train: error: no checkpoint file at {tmp_path / 'absent.pt'}\n"


def test_batch_size_must_split_across_processes(monkeypatch):
    monkeypatch.setattr("minigpt.train._distributed", lambda device: (0, 3))
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
        "--warmup-steps", "10", "--eval-every", "1000", "--probe-mix", "0.5", "--out", str(out),
    ]
    # The model override (context 32) has no flag, so the DDP run uses the preset's context: build
    # the single-process reference the same way. Half of each batch is probes, which every rank
    # must draw alike.
    single, _ = train(replace(TINY, model_overrides={}, probe_mix=0.5), progress=False)
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ddp, _ = load_checkpoint(out)
    for (name, a), b in zip(single.state_dict().items(), ddp.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-5), name


def test_resume_refuses_a_checkpoint_of_another_shape(tmp_path):
    train(TINY, out=tmp_path / "nano.pt", progress=False)
    with pytest.raises(ValueError, match="holds a model of config"):
        train(replace(TINY, model_overrides={"context": 64}), resume=tmp_path / "nano.pt", progress=False)


# ---------------------------------------------------------------------------------------------
# Checkpoint precision, inference-only checkpoints, the step callback and the command line

# Embedding-heavy (512 x 32 of 28,768 parameters), so a tied table stored twice would show in the file size.
SMALL = GPTConfig(vocab_size=512, context=16, n_layer=1, n_head=2, n_kv_head=1, n_embd=32)


def small_model(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(SMALL).eval()


def short_validation(monkeypatch, windows: int = 3) -> None:
    """Validate on the first few windows of the held-out split only, so a run's final evaluation is quick."""
    real = minigpt.train.corpus_tokens

    def tokens(split, tokenizer_name="minigpt-8k"):
        found = real(split, tokenizer_name)
        return found[: windows * 256 + 1] if split == "val" else found

    monkeypatch.setattr(minigpt.train, "corpus_tokens", tokens)


@pytest.mark.parametrize("dtype", sorted(SAVE_DTYPES))
def test_save_checkpoint_stores_every_weight_in_the_asked_dtype_and_tied_weights_once(tmp_path, dtype):
    model, path = small_model(), tmp_path / f"{dtype}.pt"
    save_checkpoint(path, model, None, 7, TINY, {"step": [7]}, dtype=dtype)
    saved = torch.load(path, weights_only=True)
    assert set(saved["model"]) == set(model.state_dict()) and "optimizer" not in saved
    for name, tensor in model.state_dict().items():
        assert saved["model"][name].dtype == SAVE_DTYPES[dtype], name
        assert torch.equal(saved["model"][name], tensor.to(SAVE_DTYPES[dtype])), name
    embedding, head = saved["model"]["token_embedding.weight"], saved["model"]["lm_head.weight"]
    assert embedding.untyped_storage().data_ptr() == head.untyped_storage().data_ptr()
    width = SAVE_DTYPES[dtype].itemsize
    table = SMALL.vocab_size * SMALL.n_embd
    assert model.num_parameters() * width < path.stat().st_size < (model.num_parameters() + table // 2) * width


def test_half_precision_checkpoint_is_half_the_size_and_loads_close_to_the_original(tmp_path):
    model = small_model()
    for dtype in ("float32", "float16"):
        save_checkpoint(tmp_path / f"{dtype}.pt", model, None, 1, TINY, {}, dtype=dtype)
    ratio = (tmp_path / "float16.pt").stat().st_size / (tmp_path / "float32.pt").stat().st_size
    assert 0.45 < ratio < 0.6
    loaded, checkpoint = load_checkpoint(tmp_path / "float16.pt")
    assert loaded.config == model.config
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    assert loaded.lm_head.weight is loaded.token_embedding.weight  # still tied after the cast back
    x = torch.randint(0, SMALL.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        original, rounded = model(x).logits, loaded(x).logits
    assert not torch.equal(original, rounded)  # the weights really were rounded
    assert (original - rounded).abs().max() < 0.01 * original.abs().max()


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_checkpoint_records_its_command_step_configs_and_history(tmp_path, dtype):
    model, history = small_model(), {"step": [1, 2], "train_loss": [9.1, 8.7], "val_step": [], "val_bpb": []}
    command = "python -m minigpt.train --preset nano --save-dtype " + dtype
    save_checkpoint(tmp_path / "c.pt", model, None, 2, TINY, history, dtype=dtype, command=command)
    loaded, checkpoint = load_checkpoint(tmp_path / "c.pt")
    assert checkpoint["command"] == command and checkpoint["step"] == 2
    assert json.loads(checkpoint["history"]) == history
    assert json.loads(checkpoint["train_config"]) == json.loads(json.dumps(asdict(TINY)))  # tuples come back as lists
    assert checkpoint["model_config"] == asdict(SMALL)
    save_checkpoint(tmp_path / "plain.pt", model, None, 2, TINY, history)
    assert load_checkpoint(tmp_path / "plain.pt")[1]["command"] == ""


def test_save_checkpoint_refuses_an_unknown_dtype(tmp_path):
    with pytest.raises(ValueError, match=r"dtype must be one of \['bfloat16', 'float16', 'float32'\], not 'float64'"):
        save_checkpoint(tmp_path / "x.pt", small_model(), None, 0, TINY, {}, dtype="float64")
    assert not (tmp_path / "x.pt").exists()


def test_train_calls_on_step_after_every_step_and_saves_for_inference_only(tmp_path, monkeypatch):
    short_validation(monkeypatch)
    seen = []

    def on_step(history):
        seen.append((history, list(history["step"]), len(history["train_loss"]), list(history["val_step"])))

    out = tmp_path / "inference.pt"
    model, history = train(TINY, out=out, progress=False, on_step=on_step, save_dtype="float16",
                           save_optimizer=False, command="made by a test")
    assert [steps for _, steps, _, _ in seen] == [[1], [1, 2], [1, 2, 3], [1, 2, 3, 4]]
    assert [n for _, _, n, _ in seen] == [1, 2, 3, 4]
    assert [val for _, _, _, val in seen] == [[], [], [], [4]]  # the final evaluation comes before the callback
    assert all(h is history for h, _, _, _ in seen)

    loaded, checkpoint = load_checkpoint(out)
    assert "optimizer" not in checkpoint and checkpoint["command"] == "made by a test"
    assert all(t.dtype == torch.float16 for t in checkpoint["model"].values())
    x = torch.randint(0, model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(loaded(x).logits, model.eval()(x).logits, atol=0.05)

    with pytest.raises(ValueError, match="has no optimizer state"):
        train(TINY, resume=out, progress=False)


def cli_args(out, *extra):
    return ["--preset", "nano", "--steps", "2", "--batch-size", "2", "--warmup-steps", "10", "--eval-every", "1000",
            "--out", str(out), *extra]


@pytest.mark.parametrize("flags, dtype, has_optimizer", [
    ([], torch.float32, True),
    (["--save-dtype", "float16", "--no-optimizer"], torch.float16, False),
    (["--save-dtype", "bfloat16"], torch.bfloat16, True),
])
def test_command_line_saves_the_checkpoint_as_asked_and_its_loss_curve(tmp_path, monkeypatch, capsys, flags, dtype,
                                                                       has_optimizer):
    short_validation(monkeypatch)
    out = tmp_path / "run" / "nano.pt"
    argv = cli_args(out, *flags)
    main(argv)
    checkpoint = torch.load(out, weights_only=True)
    assert all(t.dtype == dtype for t in checkpoint["model"].values())
    assert ("optimizer" in checkpoint) == has_optimizer
    assert checkpoint["step"] == 2
    assert checkpoint["command"] == "python -m minigpt.train " + " ".join(argv)
    curve = out.with_suffix(".png")
    data = curve.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert int.from_bytes(data[16:20], "big") == 1000  # the 10-inch training plot at 100 dpi
    assert f"loss curve {curve}" in capsys.readouterr().out


def test_command_line_refuses_an_unknown_save_dtype(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(cli_args(tmp_path / "x.pt", "--save-dtype", "float64"))
    assert exit_info.value.code == 2
    assert "invalid choice: 'float64'" in capsys.readouterr().err
    assert not (tmp_path / "x.pt").exists()


# --- the synthetic probe mix ---------------------------------------------------------------------

PROBE_STARTS = ("There is a pass key", "Remember the value", "Keep track of", "Here is a list", "User: Give me",
                "Say these words")


def test_probe_size_limits_fit_each_kind_and_leave_out_what_cannot_fit():
    tok = load_tokenizer("minigpt-8k")
    limits = probe_size_limits("minigpt-8k", 257)
    assert set(limits) == set(data.PROBE_KINDS)
    for kind, (smallest, largest) in limits.items():
        assert smallest < largest
        assert len(tok.encode_ordinary(data.probe_text(kind, random.Random(0), largest))) <= 257
        assert len(tok.encode_ordinary(data.probe_text(kind, random.Random(0), 2 * largest + 2))) > 257
    assert "variable-chain" not in probe_size_limits("minigpt-8k", 100)  # its smallest needs ~150 tokens


def test_probe_window_is_seeded_packed_probes_of_the_exact_length():
    tok = load_tokenizer("minigpt-8k")
    window = probe_window(random.Random(3), "minigpt-8k", 257)
    assert window.shape == (257,) and window.dtype == torch.long
    assert torch.equal(window, probe_window(random.Random(3), "minigpt-8k", 257))
    assert not torch.equal(window, probe_window(random.Random(4), "minigpt-8k", 257))
    text = tok.decode(window.tolist())
    pieces = text.split("\n\n")
    assert len(pieces) >= 2  # at least one whole probe, then the start of the next
    assert all(piece.startswith(PROBE_STARTS) for piece in pieces if piece)
    whole = pieces[0]
    assert any(whole.startswith(start) for start in PROBE_STARTS)


def test_training_batch_replaces_the_last_rows_with_probes():
    tokens = corpus_tokens("train")
    config = replace(TINY, batch_size=8, probe_mix=0.25)
    x, y = training_batch(tokens, config, 64, torch.Generator().manual_seed(0), random.Random(0), "minigpt-8k")
    plain_x, plain_y = sample_batch(tokens, 8, 64, torch.Generator().manual_seed(0))
    assert torch.equal(x[:6], plain_x[:6]) and torch.equal(y[:6], plain_y[:6])  # 6 Shakespeare rows
    assert torch.equal(x[6:, 1:], y[6:, :-1])  # targets are the inputs shifted by one
    tok = load_tokenizer("minigpt-8k")
    assert all(tok.decode(row.tolist()).startswith(PROBE_STARTS) for row in x[6:])
    unmixed, _ = training_batch(tokens, replace(config, probe_mix=0.0), 64, torch.Generator().manual_seed(0),
                                random.Random(0), "minigpt-8k")
    assert torch.equal(unmixed, plain_x)


def test_probe_rows_score_the_whole_text_or_only_the_answers():
    tok = load_tokenizer("minigpt-8k")
    x, y = probe_rows(random.Random(3), "minigpt-8k", 256, ("edit",))
    assert torch.equal(x, probe_window(random.Random(3), "minigpt-8k", 257, ("edit",))[:-1])
    assert torch.equal(x[1:], y[:-1])
    x, y = probe_rows(random.Random(3), "minigpt-8k", 256, ("edit",), answer_only=True)
    scored = y != IGNORE_TARGET
    assert 0 < scored.sum() < 256 and torch.equal(x[1:][scored[:-1]], y[:-1][scored[:-1]])
    # Every scored stretch is an edited passage and the blank line after it, never the request.
    stretches = tok.decode(y[scored].tolist()).split("\n\n")
    assert not any("Replace every" in stretch or "Edited:" in stretch for stretch in stretches)
    rng = random.Random(3)
    rng.choice(["edit"])
    probe = data.make_probe("edit", rng, rng.randint(*probe_size_limits("minigpt-8k", 257, ("edit",))["edit"]))
    assert tok.decode(y[scored].tolist()).startswith(probe.answer + "\n\n")


def test_training_batch_with_answer_loss_leaves_the_corpus_rows_whole():
    tokens = corpus_tokens("train")
    config = replace(TINY, batch_size=8, probe_mix=0.5, probe_kinds=("edit",), answer_loss_only=True)
    x, y = training_batch(tokens, config, 64, torch.Generator().manual_seed(0), random.Random(0), "minigpt-8k")
    plain_x, plain_y = sample_batch(tokens, 8, 64, torch.Generator().manual_seed(0))
    assert torch.equal(x[:4], plain_x[:4]) and torch.equal(y[:4], plain_y[:4])
    assert (x >= 0).all()  # an ignored target never leaks into the inputs
    assert (y[4:] == IGNORE_TARGET).any() and (y[:4] != IGNORE_TARGET).all()


def test_answer_loss_only_trains_from_the_command_line(tmp_path):
    out = tmp_path / "edit.pt"
    main(["--preset", "nano", "--steps", "2", "--batch-size", "4", "--eval-every", "1000", "--context", "64",
          "--probe-mix", "0.5", "--probe-kinds", "edit", "--answer-loss-only", "--out", str(out)])
    _, checkpoint = load_checkpoint(out)
    assert json.loads(checkpoint["train_config"])["answer_loss_only"] is True


@pytest.mark.parametrize("mix", [-0.1, 1.5])
def test_probe_mix_outside_zero_to_one_is_refused(mix):
    with pytest.raises(ValueError, match="probe_mix is the share of probe rows per batch, from 0 to 1"):
        train(replace(TINY, probe_mix=mix), progress=False)


def test_resume_with_a_probe_mix_continues_exactly(tmp_path):
    mixed = replace(TINY, probe_mix=0.5)
    straight, _ = train(mixed, progress=False)
    train(replace(mixed, steps=2), out=tmp_path / "half.pt", progress=False)
    resumed, _ = train(mixed, resume=tmp_path / "half.pt", progress=False)
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), name


def test_probe_window_draws_only_the_asked_kinds():
    tok = load_tokenizer("minigpt-8k")
    text = tok.decode(probe_window(random.Random(0), "minigpt-8k", 600, ("passkey",)).tolist())
    assert all(piece.startswith("There is a pass key") for piece in text.split("\n\n") if piece)
    with pytest.raises(ValueError, match="none of the probe kinds"):
        probe_window(random.Random(0), "minigpt-8k", 100, ("variable-chain",))


def test_unknown_probe_kinds_are_refused():
    with pytest.raises(ValueError, match="probe_kinds must name some of"):
        train(replace(TINY, probe_mix=0.5, probe_kinds=("passkey", "haystack")), progress=False)


def config_from_command_line(monkeypatch, argv: list[str]) -> TrainConfig:
    """The TrainConfig that `main(argv)` hands to `train`, with training itself replaced by a stub."""
    seen = {}

    def fake_train(config, out, resume, **kwargs):
        seen["config"] = config
        return None, {"step": [1], "train_loss": [9.0], "val_step": [1], "val_bpb": [3.0], "seconds": [0.1]}

    monkeypatch.setattr(minigpt.train, "train", fake_train)
    main(argv)
    return seen["config"]


def test_command_line_context_and_probe_kinds_reach_the_run(tmp_path, monkeypatch):
    config = config_from_command_line(monkeypatch, ["--preset", "nano", "--context", "128", "--probe-mix", "1",
                                                    "--probe-kinds", "passkey", "kv", "--out", str(tmp_path / "lc.pt")])
    assert config.model_overrides == {"context": 128} and config.probe_kinds == ("passkey", "kv")
    assert config.probe_mix == 1.0
    assert (tmp_path / "lc.png").exists()


def test_command_line_rope_base_reaches_the_model(tmp_path, monkeypatch):
    config = config_from_command_line(monkeypatch, ["--preset", "nano", "--rope-base", "10", "--out", str(tmp_path / "b.pt")])
    assert config.model_overrides == {"rope_base": 10.0}
    model = minigpt.train.starting_model(config)
    assert model.config.rope_base == 10.0 and model.rotary.base == 10.0


def test_most_common_tokens_ranks_by_count():
    tokens = torch.tensor([3, 3, 3, 1, 1, 7, 0, 0])
    assert most_common_tokens(tokens, 3).tolist() == [3, 0, 1]  # 0 and 1 tie: the lower id first
    with pytest.raises(ValueError, match="ids only go up to 7"):
        most_common_tokens(tokens, 9)


def test_learning_rate_runs_the_copy_curriculum_first_then_the_corpus_schedule():
    corpus_only = TrainConfig(steps=1000, warmup_steps=100, learning_rate=1e-3, min_learning_rate=1e-4)
    with_copy = replace(corpus_only, copy_steps=500, copy_learning_rate=5e-4)
    assert learning_rate(0, with_copy) == pytest.approx(5e-6)
    assert [learning_rate(s, with_copy) for s in (99, 300, 499)] == pytest.approx([5e-4] * 3)
    assert [learning_rate(500 + s, with_copy) for s in range(1001)] == [learning_rate(s, corpus_only) for s in range(1001)]


def test_copy_curriculum_trains_on_repeated_segments_then_the_same_corpus_batches(monkeypatch):
    seen = []
    forward = GPT.forward

    def recording_forward(self, idx, targets=None, **kwargs):
        seen.append(idx.clone())
        return forward(self, idx, targets, **kwargs)

    monkeypatch.setattr(GPT, "forward", recording_forward)
    curriculum = replace(TINY, copy_steps=3, copy_batch_size=6, copy_length=20, copy_vocab=50)
    _, history = train(curriculum, progress=False)
    training = [x for x in seen if x.shape[0] in (4, 6) and x.shape[1] in (20, 32)]
    assert [tuple(x.shape) for x in training] == [(6, 20)] * 3 + [(4, 32)] * 4
    common = set(most_common_tokens(corpus_tokens("train"), 50).tolist())
    assert all(set(x.unique().tolist()) <= common for x in training[:3])
    seen.clear()
    train(TINY, progress=False)
    plain = [x for x in seen if x.shape == (4, 32)]
    assert all(torch.equal(a, b) for a, b in zip(training[3:], plain)) and len(plain) == 4
    assert history["step"] == list(range(1, 8)) and len(history["val_induction"]) == 1


def test_resume_inside_the_copy_curriculum_continues_exactly(tmp_path):
    curriculum = replace(TINY, copy_steps=3, copy_batch_size=4, copy_length=16, warmup_steps=1,
                         learning_rate=1e-3, min_learning_rate=1e-3)
    straight, _ = train(curriculum, progress=False)
    train(replace(curriculum, steps=0, copy_steps=2), out=tmp_path / "copying.pt", progress=False)
    resumed, history = train(curriculum, resume=tmp_path / "copying.pt", progress=False)
    assert history["step"] == list(range(1, 8))
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), name


@pytest.mark.parametrize("change, match", [
    ({"copy_steps": -1}, "copy_steps must be at least 0"),
    ({"copy_batch_size": 1}, "copy_batch_size must be at least 2"),
    ({"copy_steps": 1, "copy_length": 64}, r"copy_length \(64\) must fit the context \(32\)"),
])
def test_bad_curriculum_settings_are_refused(change, match):
    with pytest.raises(ValueError, match=match):
        train(replace(TINY, **change), progress=False)


def test_init_from_starts_from_a_checkpoint_with_a_longer_context_and_rope_scaling(tmp_path):
    base, _ = train(TINY, out=tmp_path / "short.pt", progress=False)
    longer = replace(TINY, steps=1, learning_rate=0.0, min_learning_rate=0.0, warmup_steps=1,
                     init_from=str(tmp_path / "short.pt"),
                     model_overrides={"context": 128, "rope_scaling": "yarn", "rope_factor": 4.0,
                                      "rope_original_context": 32})
    tuned, _ = train(longer, out=tmp_path / "long.pt", progress=False)
    assert tuned.config == replace(base.config, context=128, rope_scaling="yarn", rope_factor=4.0,
                                   rope_original_context=32)
    for (name, a), b in zip(base.state_dict().items(), tuned.state_dict().values()):
        assert torch.equal(a, b), name  # a zero learning rate leaves the checkpoint's weights as they were
    resumed, _ = train(replace(longer, steps=2), resume=tmp_path / "long.pt", progress=False)
    assert resumed.config == tuned.config


def test_command_line_curriculum_init_and_rope_flags_reach_the_run(tmp_path, monkeypatch):
    config = config_from_command_line(monkeypatch, [
        "--preset", "nano", "--copy-steps", "1500", "--copy-batch-size", "32", "--copy-learning-rate", "2e-3",
        "--copy-mix", "0.25", "--init-from", str(tmp_path / "base.pt"), "--context", "512", "--rope-scaling", "yarn",
        "--rope-factor", "4", "--rope-original-context", "128", "--out", str(tmp_path / "ft.pt")])
    assert (config.copy_steps, config.copy_batch_size, config.copy_learning_rate, config.copy_mix) == (1500, 32, 2e-3, 0.25)
    assert config.init_from == str(tmp_path / "base.pt")
    assert config.model_overrides == {"context": 512, "rope_scaling": "yarn", "rope_factor": 4.0,
                                      "rope_original_context": 128}


def test_copy_mix_replaces_the_last_rows_with_repeated_segments_after_the_probes():
    tokens, ids = corpus_tokens("train"), torch.arange(100, 1100)
    config = replace(TINY, batch_size=8, probe_mix=0.25, copy_mix=0.25)
    x, y = training_batch(tokens, config, 64, torch.Generator().manual_seed(0), random.Random(0), "minigpt-8k",
                          ids, torch.Generator().manual_seed(1))
    plain_x, _ = sample_batch(tokens, 8, 64, torch.Generator().manual_seed(0))
    assert torch.equal(x[:4], plain_x[:4])  # 4 Shakespeare rows, then 2 probes, then 2 curriculum rows
    tok = load_tokenizer("minigpt-8k")
    assert all(tok.decode(row.tolist()).startswith(PROBE_STARTS) for row in x[4:6])
    want = data.repeated_segments(2, 65, ids, torch.Generator().manual_seed(1))
    assert torch.equal(x[6:], want[:, :-1]) and torch.equal(y[6:], want[:, 1:])
    with pytest.raises(ValueError, match="copy_mix needs the curriculum's token ids"):
        training_batch(tokens, config, 64, torch.Generator(), random.Random(0), "minigpt-8k")


@pytest.mark.parametrize("probe_mix, copy_mix", [(0.0, -0.1), (0.5, 0.75)])
def test_copy_mix_beyond_what_the_probes_leave_is_refused(probe_mix, copy_mix):
    with pytest.raises(ValueError, match="copy_mix is the share of curriculum rows per batch"):
        train(replace(TINY, probe_mix=probe_mix, copy_mix=copy_mix), progress=False)


def test_command_line_init_from_without_out_never_overwrites_the_starting_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setattr(minigpt.train, "CHECKPOINT_DIR", tmp_path)
    config_from_command_line(monkeypatch, ["--init-from", str(tmp_path / "nano-passkey.pt"), "--context", "256"])
    assert (tmp_path / "nano-passkey-tuned.png").exists() and not (tmp_path / "nano-passkey.png").exists()


def test_yarn_factor_augmentation_trains_as_yarn_at_that_factor_and_keeps_the_model_plain():
    augmented, _ = train(replace(TINY, yarn_factors=(8.0,)), progress=False)
    static, _ = train(replace(TINY, model_overrides={"context": 32, "rope_scaling": "yarn", "rope_factor": 8.0,
                                                     "rope_original_context": 32}), progress=False)
    plain, _ = train(TINY, progress=False)
    for (name, a), b in zip(augmented.state_dict().items(), static.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), name
    assert not all(torch.allclose(a, b, atol=1e-4) for a, b in zip(augmented.state_dict().values(),
                                                                    plain.state_dict().values()))
    assert augmented.config == plain.config and augmented.rotary.scaling == plain.rotary.scaling  # restored


def test_yarn_factor_one_is_plain_rope():
    augmented, _ = train(replace(TINY, yarn_factors=(1.0,)), progress=False)
    plain, _ = train(TINY, progress=False)
    for (name, a), b in zip(augmented.state_dict().items(), plain.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), name


def test_yarn_factors_are_drawn_per_step_from_a_seeded_stream_that_resume_replays(tmp_path, monkeypatch):
    drawn = []
    applied = minigpt.train.rope_scaling_applied

    def recording(model, scaling):
        drawn.append(scaling.factor)
        return applied(model, scaling)

    monkeypatch.setattr(minigpt.train, "rope_scaling_applied", recording)
    augmented = replace(TINY, steps=12, yarn_factors=(1.0, 2.0, 4.0))
    straight, _ = train(augmented, progress=False)
    assert set(drawn) == {1.0, 2.0, 4.0} and len(drawn) == 12
    first = list(drawn)
    drawn.clear()
    train(replace(augmented, steps=5), out=tmp_path / "half.pt", progress=False)
    resumed, _ = train(augmented, resume=tmp_path / "half.pt", progress=False)
    assert drawn == first  # 5 steps, then the 7 after the resume: the same draws in the same order
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), name


@pytest.mark.parametrize("change, match", [
    ({"yarn_factors": (0.5,)}, r"each >= 1 and finite; got \(0.5,\)"),
    ({"yarn_factors": (2.0, math.inf)}, "each >= 1 and finite"),
    ({"yarn_factors": (2.0,), "model_overrides": {"context": 32, "rope_scaling": "linear", "rope_factor": 2.0,
                                                   "rope_original_context": 16}},
     "yarn_factors augments plain RoPE, but this model already uses 'linear'"),
])
def test_bad_yarn_factors_are_refused(change, match):
    with pytest.raises(ValueError, match=match):
        train(replace(TINY, **change), progress=False)


def test_command_line_yarn_factors_reach_the_run(tmp_path, monkeypatch):
    config = config_from_command_line(monkeypatch, ["--preset", "nano", "--yarn-factors", "1", "4", "16",
                                                    "--out", str(tmp_path / "y.pt")])
    assert config.yarn_factors == (1.0, 4.0, 16.0)


def test_skipped_rotary_leaves_out_the_skipped_positions():
    rotary = RotaryEmbedding(16)
    cos, sin = SkippedRotary(rotary, cut=3, skip=5)(0, 8)
    full_cos, full_sin = rotary(0, 13)
    kept = [0, 1, 2, 8, 9, 10, 11, 12]  # positions 0..2, then 3 + 5 onwards
    assert torch.equal(cos, full_cos[kept]) and torch.equal(sin, full_sin[kept])
    cos, _ = SkippedRotary(rotary, cut=10, skip=5)(0, 8)  # a cut past the end: nothing moves
    assert torch.equal(cos, rotary(0, 8)[0])


def test_a_skip_moves_keys_before_the_cut_further_from_queries_after_it():
    torch.manual_seed(0)
    model = GPT(GPTConfig(context=32, n_layer=1, n_head=2, n_kv_head=1, n_embd=16)).eval()
    tokens = torch.randint(0, 100, (1, 12))
    with torch.no_grad():
        plain = model(tokens).logits
        with positions_skipped(model, cut=4, skip=0):
            assert torch.equal(model(tokens).logits, plain)
        with positions_skipped(model, cut=4, skip=7):
            skipped = model(tokens).logits
    assert type(model.rotary).__name__ == "RotaryEmbedding"  # restored
    assert torch.allclose(skipped[:, :4], plain[:, :4], atol=1e-6)  # before the cut nothing changes
    assert not torch.allclose(skipped[:, 4:], plain[:, 4:], atol=1e-4)


def test_position_skip_is_drawn_per_step_from_a_seeded_stream_that_resume_replays(tmp_path, monkeypatch):
    drawn = []
    skipped = minigpt.train.positions_skipped

    def recording(model, cut, skip):
        drawn.append((cut, skip))
        return skipped(model, cut, skip)

    monkeypatch.setattr(minigpt.train, "positions_skipped", recording)
    config = replace(TINY, steps=8, position_skip=50)
    straight, _ = train(config, progress=False)
    assert len(drawn) == 8 and all(1 <= cut < 32 and 0 <= skip <= 50 for cut, skip in drawn)
    assert len({skip for _, skip in drawn}) > 1
    first = list(drawn)
    drawn.clear()
    train(replace(config, steps=3), out=tmp_path / "half.pt", progress=False)
    resumed, _ = train(config, resume=tmp_path / "half.pt", progress=False)
    assert drawn == first
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), name


def test_bad_position_skip_is_refused_and_the_flag_reaches_the_run(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="position_skip is the largest jump in positions, 0 or more; got -1"):
        train(replace(TINY, position_skip=-1), progress=False)
    config = config_from_command_line(monkeypatch, ["--preset", "nano", "--position-skip", "1920",
                                                    "--out", str(tmp_path / "p.pt")])
    assert config.position_skip == 1920


# ---------------------------------------------------------------------------------------------
# Training on a GPU

def test_training_device_names_cpu_or_cuda_and_refuses_others():
    assert training_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="device must be 'cpu' or 'cuda', got 'tpu'"):
        training_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="PyTorch sees no CUDA GPU here"):
            train(TINY, progress=False, device="cuda")


def test_command_line_device_reaches_the_run(tmp_path, monkeypatch):
    seen = {}

    def fake_train(config, out, resume, **kwargs):
        seen.update(kwargs)
        return None, {"step": [1], "train_loss": [9.0], "val_step": [1], "val_bpb": [3.0], "seconds": [0.1]}

    monkeypatch.setattr(minigpt.train, "train", fake_train)
    main(["--preset", "nano", "--device", "cuda", "--out", str(tmp_path / "g.pt")])
    assert seen["device"] == "cuda"
    main(["--preset", "nano", "--out", str(tmp_path / "c.pt")])
    assert seen["device"] == "cpu"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on a machine that has one)")
def test_cuda_training_takes_the_cpu_steps_and_saves_a_cpu_checkpoint(tmp_path):
    """The same seeded batches on the GPU: the weights match the CPU run's up to float rounding."""
    config = replace(TINY, copy_steps=2, copy_batch_size=4, copy_length=8, probe_mix=0.5)
    on_cpu, _ = train(config, progress=False)
    on_gpu, history = train(config, out=tmp_path / "gpu.pt", progress=False, device="cuda")
    assert next(on_gpu.parameters()).is_cuda
    for (name, a), b in zip(on_cpu.state_dict().items(), on_gpu.state_dict().values()):
        assert torch.allclose(a, b.cpu(), atol=1e-4), name
    saved = torch.load(tmp_path / "gpu.pt", weights_only=True)["model"]  # no map_location: tensors land where saved
    assert not any(tensor.is_cuda for tensor in saved.values())  # CPU tensors: the file loads on a machine with no GPU
    loaded, _ = load_checkpoint(tmp_path / "gpu.pt")
    for (name, a), b in zip(loaded.state_dict().items(), on_gpu.state_dict().values()):
        assert torch.equal(a, b.cpu()), name


def test_retrain_command_replaces_the_recorded_out_path():
    recorded = {"command": "python -m minigpt.train --preset nano --steps 2000 --out /elsewhere/nano.pt --seed 0"}
    assert retrain_arguments(recorded, Path("data/checkpoints/nano.pt")) == [
        "--preset", "nano", "--steps", "2000", "--seed", "0", "--out", "data/checkpoints/nano.pt"]
    assert retrain_command(recorded, "data/checkpoints/nano.pt") == (
        "python -m minigpt.train --preset nano --steps 2000 --seed 0 --out data/checkpoints/nano.pt")
    assert retrain_command({"command": "python -m minigpt.train --preset mini"}, "m.pt").endswith("--preset mini --out m.pt")
    with pytest.raises(ValueError, match="not a recorded minigpt.train command"):
        retrain_arguments({"command": "python -m minigpt.long_context evaluate"}, "x.pt")


def test_every_shipped_checkpoint_records_a_command_that_retrains_it():
    for path in sorted(minigpt.train.CHECKPOINT_DIR.glob("*.pt")):
        checkpoint = torch.load(path, weights_only=True)
        if "vision_config" in checkpoint:  # made by python -m minigpt.vision train (tests/test_vision.py)
            continue
        if checkpoint["command"].startswith("python -m minigpt.speculative distill"):  # tests/test_speculative.py
            continue
        arguments = retrain_arguments(checkpoint, path)
        assert arguments[-2:] == ["--out", str(path)] and arguments.count("--out") == 1, path.name
