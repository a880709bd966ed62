"""Checks for the exercises of notebook 03 (the transformer).

1. `check_rms_norm`: RMSNorm with its learned weight, against `minigpt.model.RMSNorm`.
2. `check_temperature`: next-token probabilities at a temperature, against what `GPT.generate` samples from.
3. `check_bits_per_byte`: a loss in nats per token turned into bits per byte, against `minigpt.train.bits_per_byte`.
4. `check_parameter_count`: a model's parameter count from its `GPTConfig` alone, against `GPT.num_parameters`.

Every expected value is computed here with the package's own code; no hint contains one.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable

import torch

from minigpt.exercises import CheckResult, call, call_for_tensor, close_to, not_yet, right
from minigpt.model import GPT, GPTConfig, RMSNorm, preset
from minigpt.train import bits_per_byte

RMS_NORM = "Exercise 1 (RMSNorm)"
TEMPERATURE = "Exercise 2 (temperature)"
BITS_PER_BYTE = "Exercise 3 (bits per byte)"
PARAMETER_COUNT = "Exercise 4 (counting parameters)"


# --- Exercise 1: RMSNorm ----------------------------------------------------------------------


def _rms_norm_cases() -> list[tuple[torch.Tensor, RMSNorm]]:
    """Inputs `(..., d)` and package norms with a random learned weight: plain, off-centre, and tiny
    inputs where eps matters."""
    generator = torch.Generator().manual_seed(3)
    cases = []
    for shape, scale, offset, eps in (((3, 8), 1.0, 0.0, 1e-5), ((2, 5, 16), 7.0, 3.0, 1e-5),
                                      ((4, 32), 0.01, 0.0, 1e-2)):
        x = torch.randn(shape, generator=generator) * scale + offset
        norm = RMSNorm(shape[-1], eps)
        with torch.no_grad():
            norm.weight.copy_(torch.rand(shape[-1], generator=generator) * 2 + 0.5)  # a learned gain, not all ones
        cases.append((x, norm))
    return cases


def check_rms_norm(rms_norm: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]) -> CheckResult:
    """Exercise 1: `rms_norm(x, weight, eps)` must equal `minigpt.model.RMSNorm(d, eps)` whose weight is
    `weight`, on inputs of several shapes, scales and offsets, with the `eps` it passes (one case with
    an eps of 1e-2 on inputs so small that it is not negligible)."""
    for x, norm in _rms_norm_cases():
        weight = norm.weight.detach().clone()
        result, verdict = call_for_tensor(RMS_NORM, rms_norm, x.clone(), weight, norm.eps)
        if verdict is not None:
            return verdict
        result = result.float()
        if result.shape != x.shape:
            return not_yet(RMS_NORM, f"the output must have the input's shape {tuple(x.shape)}, got "
                                     f"{tuple(result.shape)}: reduce over the last axis with keepdim=True.")
        with torch.no_grad():
            expected = norm(x)
            rms = x.pow(2).mean(-1, keepdim=True)
            without_weight = x * torch.rsqrt(rms + norm.eps)
            centred = x - x.mean(-1, keepdim=True)
            layer_norm_like = centred * torch.rsqrt(centred.pow(2).mean(-1, keepdim=True) + norm.eps) * weight
            eps_outside = x / (rms.sqrt() + norm.eps) * weight
            other_eps = [x * torch.rsqrt(rms + eps) * weight  # an eps of one's own, or none: the argument ignored
                         for eps in (0.0, 1e-8, 1e-6, 1e-5, 1e-3) if eps != norm.eps]
        if torch.allclose(result, expected, rtol=1e-4, atol=1e-5):
            continue
        if any(torch.allclose(result, other, rtol=1e-4, atol=1e-5) for other in other_eps):
            return not_yet(RMS_NORM, "right formula, but not with the eps the check passed: use the eps you are "
                                     "given (the function's argument), not a constant of your own.")
        if torch.allclose(result, without_weight, rtol=1e-4, atol=1e-5):
            return not_yet(RMS_NORM, "the learned weight is missing: the normalised vector is then scaled by it.")
        if torch.allclose(result, layer_norm_like, rtol=1e-4, atol=1e-5):
            return not_yet(RMS_NORM, "that is LayerNorm without the bias: RMSNorm subtracts no mean.")
        if torch.allclose(result, eps_outside, rtol=1e-4, atol=1e-5):
            return not_yet(RMS_NORM, "right idea, but eps belongs inside the square root, added to the mean "
                                     "of squares.")
        return not_yet(RMS_NORM, "each vector (the last axis) is divided by the square root of its mean square plus "
                                 "eps, then multiplied by the weight; check the axis and the order of the steps.")
    return right(RMS_NORM)


# --- Exercise 2: temperature ------------------------------------------------------------------


def _small_model() -> GPT:
    """A seeded, randomly initialised GPT small enough to build in milliseconds."""
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=64, context=16, n_layer=1, n_head=2, n_kv_head=1, n_embd=32)).eval()


def check_temperature(apply_temperature: Callable[[torch.Tensor, float], torch.Tensor]) -> CheckResult:
    """Exercise 2: `apply_temperature(logits, temperature)` must return the distribution `GPT.generate`
    samples from: softmax over the last axis of `logits / temperature`, for 1-D and 2-D logits at
    temperatures 0.5, 1 and 2; and at temperature 0 the limit, for `(vocab,)` and `(B, vocab)` logits:
    in each row, all probability on the token greedy decoding (`generate` at temperature 0) picks."""
    generator = torch.Generator().manual_seed(5)
    for logits in (torch.randn(50, generator=generator) * 3, torch.randn(3, 40, generator=generator) * 3):
        for temperature in (0.5, 1.0, 2.0):
            result, verdict = call_for_tensor(TEMPERATURE, apply_temperature, logits.clone(), temperature)
            if verdict is not None:
                return verdict
            result = result.float()
            if result.shape != logits.shape:
                return not_yet(TEMPERATURE, f"return one probability per logit: shape {tuple(logits.shape)}, "
                                            f"got {tuple(result.shape)}.")
            expected = (logits / temperature).softmax(dim=-1)  # what GPT.generate samples from
            if torch.allclose(result, expected, atol=1e-6):
                continue
            if not (torch.all(result >= 0) and torch.allclose(result.sum(-1), torch.ones(()), atol=1e-4)):
                return not_yet(TEMPERATURE, "the result must be probabilities: non-negative, and summing to 1 "
                                            "over the last axis (the vocabulary) of each row.")
            if torch.allclose(result, (logits * temperature).softmax(dim=-1), atol=1e-6):
                return not_yet(TEMPERATURE, "at temperature 0.5 your distribution is flatter than at 1: a low "
                                            "temperature should sharpen it. Divide or multiply?")
            return not_yet(TEMPERATURE, f"at temperature {temperature} the probabilities are off: scale the logits "
                                        "by the temperature, then take the softmax over the last axis.")
    model = _small_model()
    prompt = torch.tensor([[3, 14, 15, 9, 2]])  # (1, T)
    with torch.no_grad():
        logits = model(prompt).logits[0, -1]  # (vocab,)
    greedy_token = model.generate(prompt, max_new_tokens=1, temperature=0)[0, -1].item()
    batch_prompt = torch.tensor([[3, 14, 15, 9, 2], [2, 7, 1, 8, 28], [1, 41, 42, 13, 5]])  # (B, T)
    with torch.no_grad():
        batch_logits = model(batch_prompt).logits[:, -1]  # (B, vocab)
    batch_greedy = model.generate(batch_prompt, max_new_tokens=1, temperature=0)[:, -1]  # (B,)
    limit_hint = ("at temperature 0 the division has no value: return the limit of softmax(logits / T) as T "
                  "shrinks to 0 (try T = 0.01 and 0.001 and watch the largest probability).")
    cases = ((logits, torch.nn.functional.one_hot(torch.tensor(greedy_token), logits.shape[-1])),
             (batch_logits, torch.nn.functional.one_hot(batch_greedy, batch_logits.shape[-1])))
    for case_logits, one_hot in cases:  # (vocab,), then (B, vocab): the limit row by row
        result, verdict = call_for_tensor(TEMPERATURE, apply_temperature, case_logits.clone(), 0)
        if verdict is not None:
            return verdict
        result = result.float()
        if result.shape != case_logits.shape or not torch.isfinite(result).all():
            return not_yet(TEMPERATURE, limit_hint)
        if case_logits.ndim == 2 and not torch.allclose(result.sum(-1), torch.ones(len(result)), atol=1e-4):
            return not_yet(TEMPERATURE, "right for one row of logits, but at temperature 0 with logits (B, vocab) "
                                        "each row is a distribution of its own: each must sum to 1, over the "
                                        "last axis.")
        if not torch.allclose(result, one_hot.float(), atol=1e-6):
            return not_yet(TEMPERATURE, limit_hint)
    return right(TEMPERATURE)


# --- Exercise 3: bits per byte ----------------------------------------------------------------


def _bits_per_byte_cases() -> list[tuple[float, float, float]]:
    """(nats per token, bytes per token, the package's bits per byte) over the same windows, for two
    small random models reading random tokens whose byte lengths are drawn at random."""
    cases = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        model = GPT(GPTConfig(vocab_size=64, context=16, n_layer=1, n_head=2, n_kv_head=1, n_embd=32)).eval()
        with torch.no_grad():
            model.token_embedding.weight.mul_(20)  # a confident model, far from the uniform loss
        generator = torch.Generator().manual_seed(seed)
        tokens = torch.randint(64, (3 * 16 + 1,), generator=generator)
        byte_lengths = torch.randint(1, 7, (64,), generator=generator)  # (vocab,) bytes of each token
        package = bits_per_byte(model, tokens, byte_lengths)  # all 3 windows
        x, y = tokens[:-1].view(3, 16), tokens[1:].view(3, 16)
        with torch.no_grad():
            nats_per_token = model(x, y).loss.item()
        cases.append((nats_per_token, byte_lengths[y].float().mean().item(), package))
    return cases


def check_bits_per_byte(to_bits_per_byte: Callable[[float, float], float]) -> CheckResult:
    """Exercise 3: `to_bits_per_byte(nats_per_token, bytes_per_token)` must give what
    `minigpt.train.bits_per_byte` measures on the same windows, for two small models and texts."""
    for nats, bytes_per_token, expected in _bits_per_byte_cases():
        value, verdict = call(BITS_PER_BYTE, to_bits_per_byte, nats, bytes_per_token)
        if verdict is not None:
            return verdict
        if close_to(value, expected, rel=1e-4):
            continue
        if close_to(value, nats / bytes_per_token, rel=1e-4):
            return not_yet(BITS_PER_BYTE, "that is nats per byte: one bit is ln 2 nats, so convert the unit too.")
        if close_to(value, nats * math.log(2) / bytes_per_token, rel=1e-4):
            return not_yet(BITS_PER_BYTE, "the unit conversion goes the wrong way: a bit is smaller than a nat "
                                          "(1 bit = ln 2 = 0.69 nats), so a loss has more bits than nats.")
        if close_to(value, nats / math.log(2) * bytes_per_token, rel=1e-4):
            return not_yet(BITS_PER_BYTE, "a token spans several bytes, so the loss per byte is smaller than the "
                                          "loss per token: divide by the bytes per token.")
        return not_yet(BITS_PER_BYTE, "two steps: nats to bits, then per token to per byte.")
    return right(BITS_PER_BYTE)


# --- Exercise 4: counting parameters ----------------------------------------------------------


def _parameter_count_configs() -> list[tuple[str, GPTConfig]]:
    """The presets, and shapes that exercise every term: untied, multi-head (n_kv_head = n_head),
    multi-query, and an explicit SwiGLU width."""
    return [
        ("nano", preset("nano")),
        ("mini", preset("mini")),
        ("full", preset("full")),
        ("mini, untied", preset("mini", tie_embeddings=False)),
        ("multi-head attention", GPTConfig(vocab_size=500, n_layer=2, n_head=4, n_kv_head=4, n_embd=64)),
        ("multi-query, untied, mlp_hidden=200",
         GPTConfig(vocab_size=1000, n_layer=3, n_head=6, n_kv_head=1, n_embd=96, mlp_hidden=200, tie_embeddings=False)),
    ]


def _package_count(config: GPTConfig) -> int:
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        return GPT(config).num_parameters()


def check_parameter_count(count_parameters: Callable[[GPTConfig], int]) -> CheckResult:
    """Exercise 4: `count_parameters(config)` must equal `GPT(config).num_parameters()` for the three
    presets, `mini` untied, and configs with multi-head and multi-query attention and an explicit
    SwiGLU width."""
    wrong = []
    for name, config in _parameter_count_configs():
        value, verdict = call(PARAMETER_COUNT, count_parameters, config)
        if verdict is not None:
            return verdict
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or value != int(value):
            return not_yet(PARAMETER_COUNT, f"return a whole number of parameters (got a {type(value).__name__} "
                                            "that is not one).")
        if int(value) != _package_count(config):
            wrong.append(name)
    if not wrong:
        return right(PARAMETER_COUNT)
    if wrong == ["mini, untied", "multi-query, untied, mlp_hidden=200"] or wrong == ["mini, untied"]:
        return not_yet(PARAMETER_COUNT, "right when the embeddings are tied; untied, the output layer has a "
                                        "matrix of its own.")
    if wrong == ["multi-query, untied, mlp_hidden=200"]:
        return not_yet(PARAMETER_COUNT, "wrong only when mlp_hidden is set: use config.hidden, the SwiGLU width "
                                        "the model really builds.")
    if "multi-head attention" not in wrong and "nano" in wrong:
        return not_yet(PARAMETER_COUNT, "right when n_kv_head equals n_head, wrong otherwise: keys and values "
                                        "have n_kv_head heads each.")
    return not_yet(PARAMETER_COUNT, f"wrong for {'; '.join(wrong)}: go through section 4's breakdown term by term "
                                    "(the norms' gains count too).")
