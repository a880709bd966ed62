"""Worked solutions to the exercises of notebook 06 (the sampler)."""

import torch


def top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Exercise 1: keep the most likely tokens while those ranked above them total less than top_p."""
    sorted_logits, order = logits.sort(descending=True)
    probabilities = sorted_logits.softmax(dim=-1)
    above = probabilities.cumsum(dim=-1) - probabilities  # probability of the tokens ranked above each
    drop = torch.zeros_like(logits, dtype=torch.bool)
    drop[order] = above >= top_p
    return logits.masked_fill(drop, float("-inf"))


def judge(p: torch.Tensor, q: torch.Tensor, token: int, u: float):
    """Exercise 2: keep the draft token with probability min(1, p(x) / q(x)); else the residual."""
    if u < min(1.0, (p[token] / q[token]).item()):
        return True
    residual = (p - q).clamp(min=0)
    return residual / residual.sum()


def stop_text(chunks: list[str], stop: str) -> str:
    """Exercise 3: the text before the first stop sequence, which may span chunks."""
    text = ""
    for chunk in chunks:
        text += chunk
        found = text.find(stop)
        if found >= 0:
            return text[:found]
    return text
