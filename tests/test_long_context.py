"""Tests for minigpt/long_context.py: stretching a model's context, the passkey grid, loss by
position, and the evaluate command, on a tiny random model (the real runs live in data/)."""

import json
import math

import pytest
import torch

from minigpt import evals
from minigpt.long_context import (
    fitted_probes,
    loss_by_multiple,
    main,
    passkey_grid,
    stretch,
    training_context,
)
from minigpt.model import GPT, GPTConfig
from minigpt.train import TrainConfig, load_tokenizer, save_checkpoint

CONTEXT = 64


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("minigpt-8k")


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return GPT(GPTConfig(context=CONTEXT, n_layer=1, n_head=2, n_kv_head=1, n_embd=16)).eval()


@pytest.mark.parametrize("scheme", ["rope", "linear", "ntk", "dynamic-ntk", "yarn"])
def test_stretch_keeps_the_weights_and_multiplies_the_context(tiny, scheme):
    long = stretch(tiny, scheme, 4)
    assert long.config.context == 4 * CONTEXT and long.config.rope_original_context == CONTEXT
    assert long.config.rope_scaling == scheme and long.config.rope_factor == 4.0
    for (name, a), b in zip(tiny.state_dict().items(), long.state_dict().values()):
        assert torch.equal(a, b), name
    assert training_context(long) == CONTEXT
    assert stretch(long, scheme, 2).config.context == 2 * CONTEXT  # measured from the training length again
    ids = torch.randint(0, 8192, (1, 4 * CONTEXT))
    assert long(ids).logits.shape == (1, 4 * CONTEXT, 8192)


def test_plain_rope_stretched_equals_the_original_inside_the_training_length(tiny):
    ids = torch.randint(0, 8192, (2, CONTEXT))
    with torch.no_grad():
        torch.testing.assert_close(stretch(tiny, "rope", 8)(ids).logits, tiny(ids).logits, rtol=0, atol=1e-6)


def test_stretch_refuses_an_unknown_scheme(tiny):
    with pytest.raises(ValueError, match="unknown scheme 'alibi'"):
        stretch(tiny, "alibi", 2)


def test_fitted_probes_fill_the_length_without_passing_it(tok):
    probes = fitted_probes("passkey", tok, 256, 5, seed=3, depth=0.5)
    assert len(probes) == 5 and len({p.answer for p in probes}) > 1
    lengths = [sum(map(len, evals.probe_ids(tok, p))) for p in probes]
    assert all(256 - 30 < n <= 256 for n in lengths)  # a filler copy is 24 tokens
    assert all(p.depth == 0.5 for p in probes)
    with pytest.raises(ValueError):
        fitted_probes("variable-chain", tok, 64, 1, seed=0)  # its smallest probe needs ~150 tokens


def test_passkey_grid_is_the_accuracy_of_each_cell(tiny, tok):
    lengths, depths = [CONTEXT, 2 * CONTEXT], [0.0, 1.0]
    long = stretch(tiny, "yarn", 2)
    grid = passkey_grid(long, tok, lengths, depths, n=2, seed=1)
    assert len(grid) == 2 and all(len(row) == 2 for row in grid)
    for row, length in zip(grid, lengths):
        for value, depth in zip(row, depths):
            expected = evals.answer_accuracy(long, tok, fitted_probes("passkey", tok, length, 2, 1, depth=depth))
            assert value == expected


def test_loss_by_multiple_averages_the_positions_of_each_stretch(tiny):
    long = stretch(tiny, "ntk", 4)
    tokens = torch.randint(0, 8192, (4 * 4 * CONTEXT,), generator=torch.Generator().manual_seed(0))
    means = loss_by_multiple(long, tokens, 4 * CONTEXT, [1, 2, 4], n_windows=3)
    windows = tokens[: 3 * 4 * CONTEXT].view(3, 4 * CONTEXT)
    per_position = evals.loss_by_position(long, windows)  # (4 * CONTEXT - 1,)
    expected = [per_position[:CONTEXT].mean(), per_position[CONTEXT : 2 * CONTEXT].mean(),
                per_position[2 * CONTEXT :].mean()]
    assert means == pytest.approx([e.item() for e in expected], rel=1e-5)
    assert all(math.log(8192) - 2 < m < math.log(8192) + 2 for m in means)  # a random model: near uniform


def test_loss_by_multiple_uses_the_windows_the_text_holds_and_refuses_too_short_a_text(tiny):
    tokens = torch.randint(0, 8192, (2 * CONTEXT + 5,), generator=torch.Generator().manual_seed(0))
    two = loss_by_multiple(tiny, tokens, CONTEXT, [1], n_windows=16)  # only 2 windows fit
    assert two == pytest.approx(loss_by_multiple(tiny, tokens, CONTEXT, [1], n_windows=2))
    with pytest.raises(ValueError, match="shorter than one window"):
        loss_by_multiple(stretch(tiny, "yarn", 4), tokens[:CONTEXT], 4 * CONTEXT, [1, 4], n_windows=1)


def test_evaluate_command_writes_every_scheme_and_the_command(tmp_path, tiny, capsys):
    checkpoint = tmp_path / "tiny.pt"
    save_checkpoint(checkpoint, tiny, None, 0, TrainConfig(), {"step": []})
    out = tmp_path / "results.json"
    main(["evaluate", "--checkpoint", str(checkpoint), "--out", str(out), "--probes", "1", "--other-probes", "2",
          "--schemes", "rope", "yarn", "--multiples", "1", "2"])
    results = json.loads(out.read_text())
    assert results["probes_per_cell"] == 1 and results["other_probes_per_length"] == 2
    references = results["reference_probes"]
    assert set(references) == {"kv", "variable-chain", "frequent-word", "mrcr"}
    # No score at the 64-token training length, so nothing to keep: the variable chain and the toy
    # MRCR need more tokens than that (the MRCR fits at 2x, the chain at neither).
    assert references["variable-chain"] is None and references["mrcr"] is None
    assert all(references[kind] in (0, 0.5, 1) for kind in ("kv", "frequent-word"))  # 2 probes each
    assert results["command"].startswith("python -m minigpt.long_context evaluate --checkpoint")
    assert results["lengths"] == [CONTEXT, 2 * CONTEXT] and results["training_context"] == CONTEXT
    assert set(results["schemes"]) == {"rope", "yarn"}
    for r in results["schemes"].values():
        assert len(r["passkey_by_depth"]) == 2 and len(r["passkey_by_depth"][0]) == len(results["depths"])
        assert r["passkey"] == pytest.approx([sum(row) / len(row) for row in r["passkey_by_depth"]])
        assert set(r["probes"]) == {"kv", "variable-chain", "frequent-word", "mrcr"}
        assert r["probes"]["variable-chain"] == [None, None]  # does not fit in 64 or 128 tokens
        assert len(r["loss_by_multiple"]) == 2 and r["effective_length"] in [0, *results["lengths"]]
        assert r["effective_length"] == evals.effective_length(results["lengths"], r["passkey"], 0.05,
                                                               reference=results["reference_passkey"])
        assert r["probe_effective_length"]["variable-chain"] is None and r["probe_effective_length"]["mrcr"] is None
        assert r["probes"]["mrcr"][0] is None and r["probes"]["mrcr"][1] in (0, 0.5, 1)
        for kind in ("kv", "frequent-word"):
            assert all(a in (0, 0.5, 1) for a in r["probes"][kind])
            assert r["probe_effective_length"][kind] == evals.effective_length(
                results["lengths"], r["probes"][kind], 0.05, reference=references[kind])
    assert 0 <= results["reference_passkey"] <= 1
    assert "yarn" in capsys.readouterr().out



def test_evaluate_refuses_a_count_of_other_probes_below_one(tmp_path, tiny, capsys):
    checkpoint = tmp_path / "tiny.pt"
    save_checkpoint(checkpoint, tiny, None, 0, TrainConfig(), {"step": []})
    with pytest.raises(SystemExit):
        main(["evaluate", "--checkpoint", str(checkpoint), "--other-probes", "0"])
    assert "--other-probes must be at least 1, got 0" in capsys.readouterr().err


def test_evaluate_ends_on_a_corrupt_checkpoint_with_one_line(tmp_path, capsys):
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"PK\x03\x04 and then nothing a zip archive needs")
    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", "--checkpoint", str(corrupt)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"python -m minigpt.long_context: error: {corrupt} is not a readable minigpt checkpoint: ")


def test_evaluate_with_no_probes_measures_the_loss_only(tmp_path, tiny):
    checkpoint = tmp_path / "tiny.pt"
    save_checkpoint(checkpoint, tiny, None, 0, TrainConfig(), {"step": []})
    out = tmp_path / "loss.json"
    main(["evaluate", "--checkpoint", str(checkpoint), "--out", str(out), "--probes", "0", "--schemes", "ntk",
          "--multiples", "1", "2"])
    row = json.loads(out.read_text())["schemes"]["ntk"]
    assert set(row) == {"loss_by_multiple", "seconds"} and len(row["loss_by_multiple"]) == 2


def test_fitted_probes_fit_every_seed_even_when_word_lengths_vary(tok):
    probes = fitted_probes("frequent-word", tok, 300, 8, seed=0)
    lengths = [sum(map(len, evals.probe_ids(tok, p))) for p in probes]
    assert all(300 - 10 < n <= 300 for n in lengths)  # each filled on its own: a word is a few tokens
