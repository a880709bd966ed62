"""Worked solutions to the exercises of notebook 03 (the transformer).

Try each exercise in the notebook first; the checks there say whether you are right without giving
the answer away. Each solution's docstring explains the reasoning.
"""

import math

import torch

from minigpt.model import GPTConfig


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Exercise 1: RMSNorm with its learned weight.

    Each vector is the last axis of `x` `(..., d)`. Its mean square is taken over that axis with
    `keepdim=True`, so the result `(..., 1)` broadcasts back over the `d` entries. `eps` is added
    inside the square root: it keeps a vector of all zeros from dividing by zero, and for tiny
    inputs it is not negligible, so where it goes, and that it is the `eps` passed in rather than a
    constant of one's own, changes the result. No mean is subtracted (that is LayerNorm's step);
    the normalised vector is multiplied entry by entry by the learned weight `(d,)`, which starts
    at ones and lets training pick each channel's scale.
    """
    mean_square = x.pow(2).mean(dim=-1, keepdim=True)  # (..., 1)
    return x / torch.sqrt(mean_square + eps) * weight  # (..., d)


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Exercise 2: the next-token distribution at a temperature.

    Dividing the logits by T before the softmax multiplies every difference between two logits by
    1/T, and a probability ratio is the exponential of that difference. T < 1 widens the gaps, so
    the likeliest token takes more of the mass; T > 1 narrows them towards a uniform distribution.

    As T -> 0 the gap between the largest logit and any other grows without bound, so the largest
    logit's probability tends to 1 and every other to 0: sampling at T -> 0 is greedy decoding,
    which is why `GPT.generate` treats temperature 0 as "take the argmax". Dividing by 0 itself
    is undefined, so 0 is returned as that limit, a one-hot vector at the argmax (ties aside). The
    argmax is taken over the last axis, so for logits `(B, vocab)` each row gets its own one-hot:
    every row is a separate next-token distribution.
    """
    if temperature == 0:
        return torch.nn.functional.one_hot(logits.argmax(dim=-1), logits.shape[-1]).to(logits.dtype)
    return (logits / temperature).softmax(dim=-1)  # (..., vocab)


def to_bits_per_byte(nats_per_token: float, bytes_per_token: float) -> float:
    """Exercise 3: a loss in nats per token as bits per byte.

    Two changes of unit. Nats to bits: the cross-entropy uses the natural logarithm, and
    log2(p) = ln(p) / ln 2, so a loss in bits is the loss in nats divided by ln 2 (about 1.44 times
    larger). Per token to per byte: a token covers `bytes_per_token` bytes on average, so the same
    total surprise spread over the bytes is the per-token figure divided by that. Averaging over
    the same windows, mean nats per token / mean bytes per token is total nats / total bytes, which
    is exactly what `minigpt.train.bits_per_byte` computes.
    """
    return nats_per_token / math.log(2) / bytes_per_token


def count_parameters(config: GPTConfig) -> int:
    """Exercise 4: a model's parameter count from its config alone.

    With d = n_embd and h = head_dim, each block holds two RMSNorm gains (2d), the query
    projection (d x n_head h), the key and value projections (2 x d x n_kv_head h: grouped-query
    attention shares them between heads, so they use n_kv_head, not n_head), the output projection
    (n_head h x d), and the SwiGLU's three matrices (3 d H, with H = `config.hidden`, which honours
    an explicit `mlp_hidden`). No layer has a bias. The model adds the token embedding V d, a
    second V x d matrix for the output layer only when the embeddings are untied, and the final
    RMSNorm's gain d. Rotary positions are computed, not learned, so they add nothing.
    """
    d, h = config.n_embd, config.head_dim
    attention = d * config.n_head * h + 2 * d * config.n_kv_head * h + config.n_head * h * d
    per_block = 2 * d + attention + 3 * d * config.hidden
    embedding = config.vocab_size * d * (1 if config.tie_embeddings else 2)
    return embedding + config.n_layer * per_block + d
