"""The decoder-only transformer: GPT-4.1 mini's architecture family at laptop scale.

OpenAI has not published GPT-4.1 mini's architecture; we build the design that open models of its
generation share: pre-norm blocks with RMSNorm, a SwiGLU MLP, grouped-query attention with rotary
positions, and no biases. `PRESETS` names three sizes after the family: nano < mini < full.

Conventions later notebooks rely on: `embed` (token ids to vectors) is its own method, so image
embeddings can be spliced into the sequence; `forward` accepts a `KVCache` for incremental
decoding and can return every layer's attention probabilities for visualisation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from minigpt.attention import KVCache, attention, chunked_attention, sdpa_attention
from minigpt.positions import RopeScaling, RotaryEmbedding, apply_rotary, cached_keys_stay_exact

AttentionImpl = Literal["sdpa", "explicit", "chunked"]
ATTENTION_IMPLS = ("sdpa", "explicit", "chunked")


@dataclass(frozen=True)
class GPTConfig:
    """Everything that defines a model's shape. Stored in every checkpoint."""

    vocab_size: int = 8192
    context: int = 256  # the longest sequence the model attends over, in tokens
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int = 2  # key/value heads: n_head is MHA, 1 is MQA, in between is GQA
    n_embd: int = 128
    mlp_hidden: int = 0  # SwiGLU width; 0 means 8/3 * n_embd rounded up to a multiple of 32
    rope_base: float = 10_000.0
    rope_scaling: str = "rope"  # context extension: "rope" (none), "linear", "ntk", "dynamic-ntk", "yarn"
    rope_factor: float = 1.0  # the scale factor s: how many times past rope_original_context to stretch
    rope_original_context: int = 0  # the length the model was trained at (needed by every scaling scheme)
    tie_embeddings: bool = True  # share the input embedding with the output projection
    norm_eps: float = 1e-5
    tokenizer: str = "minigpt-8k"  # the rank file in data/tokenizer/ that the ids come from
    attention_chunk: int = 256  # query/key block of attention_impl="chunked" (no weights; a GPU wants larger blocks)

    def __post_init__(self) -> None:
        for name in ("vocab_size", "context", "n_layer", "n_head", "n_kv_head", "n_embd", "attention_chunk"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if not isinstance(self.mlp_hidden, int) or self.mlp_hidden < 0:
            raise ValueError(f"mlp_hidden must be a non-negative integer (0 = default width), got {self.mlp_hidden!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be a multiple of n_head ({self.n_head})")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_kv_head ({self.n_kv_head}) must divide n_head ({self.n_head})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim ({self.head_dim}) must be even for rotary positions")
        RopeScaling(self.rope_scaling, self.rope_factor, self.rope_original_context)  # validates them now

    @property
    def rope(self) -> RopeScaling:
        """The positional scheme as `minigpt.positions.RopeScaling`."""
        return RopeScaling(self.rope_scaling, self.rope_factor, self.rope_original_context)

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def hidden(self) -> int:
        """The SwiGLU hidden width."""
        return self.mlp_hidden or 32 * math.ceil(8 * self.n_embd / 3 / 32)


# Tied embeddings: with an 8,192-token vocabulary the embedding table is a large share of a small
# model, and sharing it with the output layer halves that cost.
PRESETS: dict[str, GPTConfig] = {
    "nano": GPTConfig(n_layer=2, n_head=4, n_kv_head=1, n_embd=64),
    "mini": GPTConfig(n_layer=4, n_head=4, n_kv_head=2, n_embd=128),
    "full": GPTConfig(n_layer=8, n_head=8, n_kv_head=2, n_embd=256),
}


FEW_ROWS = 8  # from 2 rows up to this many, `project` computes the transposed product


def project(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`x @ weight.T` for `x` `(..., in)` and `weight` `(out, in)`: what `F.linear(x, weight)` computes.

    Speculative decoding scores a few positions in one pass and counts on that pass costing about
    what one position costs: a small model's pass is the time to read its weights, and the
    arithmetic for a few rows is small beside it. On a CPU, `F.linear` on 2 to 8 rows falls short of
    that (its matrix multiply cost up to twice a single row in our measurements), while the
    transposed product `weight @ x.T` costs markedly less. The two agree up to float rounding, so
    the choice is speed alone; `benchmarks/sampler.py` measures it.
    """
    rows = x.shape[:-1].numel()
    if 1 < rows <= FEW_ROWS and x.device.type == "cpu":
        rows_first = x.reshape(rows, -1).contiguous()  # (rows, in); its .t() is a view, the layout the kernel wants
        return (weight @ rows_first.t()).t().contiguous().view(*x.shape[:-1], -1)  # (..., out)
    return F.linear(x, weight)


class Projection(nn.Linear):
    """A bias-free `nn.Linear` (same parameters and state dict) computed by `project`."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__(n_in, n_out, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return project(x, self.weight)


class RMSNorm(nn.Module):
    """Scale each vector to unit root-mean-square, then by a learned gain (no mean, no bias)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + self.eps) * self.weight


class SwiGLU(nn.Module):
    """The MLP: `down(silu(gate(x)) * up(x))`, a gated variant that trains better than GELU."""

    def __init__(self, n_embd: int, hidden: int):
        super().__init__()
        self.gate = Projection(n_embd, hidden)
        self.up = Projection(n_embd, hidden)
        self.down = Projection(hidden, n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class CausalSelfAttention(nn.Module):
    """Grouped-query self-attention with rotary positions and an optional KV cache."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        self.chunk_size = config.attention_chunk
        self.query = Projection(config.n_embd, config.n_head * config.head_dim)
        self.key_value = Projection(config.n_embd, 2 * config.n_kv_head * config.head_dim)
        self.out = Projection(config.n_head * config.head_dim, config.n_embd)

    def forward(
        self,
        x: torch.Tensor,  # (B, T, n_embd)
        cos: torch.Tensor,  # (T, head_dim // 2)
        sin: torch.Tensor,
        kv_cache: KVCache | None = None,
        layer: int = 0,
        impl: AttentionImpl = "sdpa",
        return_weights: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        q = rearrange(self.query(x), "b t (h d) -> b h t d", h=self.n_head)
        k, v = rearrange(self.key_value(x), "b t (two h d) -> two b h t d", two=2, h=self.n_kv_head)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)  # rotate before caching
        if kv_cache is not None:
            k, v = kv_cache.append(layer, k, v)  # (B, n_kv_head, past + T, head_dim)
        weights = None
        if return_weights:  # SDPA does not expose its probabilities: take the explicit path
            y, weights = attention(q, k, v, causal=True, return_weights=True)
        elif impl == "sdpa":
            y = sdpa_attention(q, k, v)
        elif impl == "explicit":
            y = attention(q, k, v)
        else:  # "chunked", the last of ATTENTION_IMPLS (checked by GPT.forward_embeddings)
            y = chunked_attention(q, k, v, chunk_size=self.chunk_size)
        return self.out(rearrange(y, "b h t d -> b t (h d)")), weights


class Block(nn.Module):
    """One transformer layer: pre-norm attention then pre-norm MLP, each added to the residual stream."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.attention_norm = RMSNorm(config.n_embd, config.norm_eps)
        self.attention = CausalSelfAttention(config)
        self.mlp_norm = RMSNorm(config.n_embd, config.norm_eps)
        self.mlp = SwiGLU(config.n_embd, config.hidden)

    def forward(self, x, cos, sin, kv_cache=None, layer=0, impl="sdpa", return_weights=False):
        attended, weights = self.attention(self.attention_norm(x), cos, sin, kv_cache, layer, impl, return_weights)
        x = x + attended
        return x + self.mlp(self.mlp_norm(x)), weights


class ModelOutput(NamedTuple):
    logits: torch.Tensor  # (B, T, vocab_size)
    loss: torch.Tensor | None  # mean cross-entropy in nats per token, when targets are given
    attentions: list[torch.Tensor] | None  # per layer (B, n_head, T, past + T), when asked for


class GPT(nn.Module):
    """Token ids in, next-token logits out."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab_size, config.n_embd)
        self.rotary = RotaryEmbedding(config.head_dim, config.rope_base, config.rope)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.final_norm = RMSNorm(config.n_embd, config.norm_eps)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.token_embedding.weight
        self.apply(self._init_weights)
        for block in self.blocks:  # residual outputs scaled down so depth does not grow the stream
            for projection in (block.attention.out, block.mlp.down):
                nn.init.normal_(projection.weight, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)

    def embed(self, idx: torch.Tensor) -> torch.Tensor:
        """Token ids `(B, T)` to vectors `(B, T, n_embd)`: the step image embeddings will join."""
        _check_ids(idx, self.config.vocab_size)
        return self.token_embedding(idx)

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        return_attention: bool = False,
        attention_impl: AttentionImpl = "sdpa",
        last_only: bool = False,
        candidates: torch.Tensor | None = None,
    ) -> ModelOutput:
        """Logits for token ids `idx` `(B, T)`; with a `kv_cache`, `idx` continues the cached sequence.

        `last_only` computes the logits of the last position only, `(B, 1, vocab)`: all a prefill
        needs, and at long contexts far smaller than `(B, T, vocab)`.

        `candidates` (1-D token ids) restricts the output to those ids: logits `(B, T, len(candidates))`,
        and `targets` are then positions in `candidates`. Training on a task whose answers are
        known to be among a few ids (the induction curriculum's 1,024) skips the rest of the
        output layer, most of a small model's compute.
        """
        return self.forward_embeddings(self.embed(idx), targets, kv_cache, return_attention, attention_impl, last_only,
                                       candidates)

    def forward_embeddings(
        self,
        x: torch.Tensor,
        targets: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        return_attention: bool = False,
        attention_impl: AttentionImpl = "sdpa",
        last_only: bool = False,
        candidates: torch.Tensor | None = None,
    ) -> ModelOutput:
        """The transformer on input vectors `x` `(B, T, n_embd)` (token or image embeddings)."""
        if last_only and targets is not None:
            raise ValueError("targets need the logits of every position; last_only gives only the last")
        x, attentions = self.residual_stream(x, kv_cache, return_attention, attention_impl)
        if last_only:
            x = x[:, -1:]  # (B, 1, n_embd)
        output_weight = self.lm_head.weight  # (vocab, n_embd)
        if candidates is not None:
            if not isinstance(candidates, torch.Tensor) or candidates.ndim != 1 or len(candidates) == 0:
                raise ValueError(f"candidates must be a non-empty 1-D tensor of token ids, got {candidates!r}")
            _check_ids(candidates[None], self.config.vocab_size, "candidates")
            output_weight = output_weight[candidates]  # (n_candidates, n_embd)
        logits = project(self.final_norm(x), output_weight)  # (B, T, vocab or n_candidates)
        loss = None
        if targets is not None:
            scored = torch.where(targets == IGNORE_TARGET, 0, targets) if isinstance(targets, torch.Tensor) else targets
            _check_ids(scored, len(output_weight), "targets" if candidates is None else "targets (positions in candidates)")
            loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_TARGET)
        return ModelOutput(logits, loss, attentions if return_attention else None)

    def residual_stream(
        self,
        x: torch.Tensor,
        kv_cache: KVCache | None = None,
        return_attention: bool = False,
        attention_impl: AttentionImpl = "sdpa",
    ) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
        """Input vectors `(B, T, n_embd)` through every block, before the final norm and output layer,
        and each layer's attention probabilities (None unless `return_attention`).

        A task scored at a few positions (a question's answer) normalizes and projects only those.
        """
        if attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"unknown attention impl {attention_impl!r}; choose 'sdpa', 'explicit' or 'chunked'")
        past = len(kv_cache) if kv_cache is not None else 0
        length = x.shape[1]
        if past + length > self.config.context:
            raise ValueError(
                f"{past} cached + {length} new tokens exceed the model's context of {self.config.context} "
                "tokens; shorten the prompt (this model never truncates it for you), or build the model with a "
                "longer context and a RoPE scaling scheme (rope_scaling, rope_factor, rope_original_context)"
            )
        cos, sin = self.rotary(past, length, x.device)
        attentions = []
        for layer, block in enumerate(self.blocks):
            x, weights = block(x, cos, sin, kv_cache, layer, attention_impl, return_attention)
            attentions.append(weights)
        return x, attentions

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 0.0,
        use_cache: bool = True,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Continue `idx` `(B, T)` by `max_new_tokens` tokens: greedy at temperature 0, else sampled.

        With `use_cache` the prompt is run once and each new token attends to the cached keys and
        values; without it every step recomputes the whole sequence (the slow baseline). Dynamic NTK
        rotates every position by a base that grows with the length, so past its original context
        the cached keys are stale: from that step on, the whole sequence is recomputed.
        """
        if not isinstance(temperature, (int, float)) or not 0 <= temperature <= 100 or math.isnan(temperature):
            raise ValueError(f"temperature must be a number from 0 (greedy) to 100, got {temperature!r}")
        if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be a non-negative integer, got {max_new_tokens!r}")
        _check_ids(idx, self.config.vocab_size)
        if idx.shape[1] + max_new_tokens > self.config.context:
            raise ValueError(
                f"a {idx.shape[1]}-token prompt plus {max_new_tokens} new tokens exceeds the model's context "
                f"of {self.config.context}; shorten the prompt or ask for fewer tokens"
            )
        cache = self.new_kv_cache(idx.shape[0]) if use_cache else None
        sequence, step_input = idx, idx
        for _ in range(max_new_tokens):
            if cache is not None and not cached_keys_stay_exact(self.config.rope, sequence.shape[1]):
                cache, step_input = None, sequence  # stale keys: recompute from here on
            logits = self(step_input, kv_cache=cache, last_only=True).logits[:, -1].float()  # (B, vocab)
            if temperature == 0:
                next_token = logits.argmax(dim=-1, keepdim=True)
            else:
                probabilities = (logits / temperature).softmax(dim=-1)
                next_token = torch.multinomial(probabilities, 1, generator=generator)
            sequence = torch.cat([sequence, next_token], dim=1)
            step_input = next_token if cache is not None else sequence
        return sequence

    def new_kv_cache(self, batch_size: int = 1, max_len: int | None = None) -> KVCache:
        """An empty KV cache sized for this model (by default, its whole context)."""
        c = self.config
        weight = self.token_embedding.weight
        return KVCache(c.n_layer, batch_size, c.n_kv_head, c.head_dim, max_len or c.context, weight.dtype, weight.device)

    def num_parameters(self, embedding: bool = True) -> int:
        """Parameters, counting shared (tied) tensors once; without the token embedding if asked."""
        total = sum(p.numel() for p in self.parameters())
        return total if embedding else total - self.token_embedding.weight.numel()


IGNORE_TARGET = -100  # a target the loss skips, as in `F.cross_entropy`


def _check_ids(idx: torch.Tensor, vocab_size: int, name: str = "token ids") -> None:
    if not isinstance(idx, torch.Tensor) or idx.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name} must be an integer tensor (torch.long), got {getattr(idx, 'dtype', type(idx).__name__)}")
    if idx.ndim != 2:
        raise ValueError(f"{name} must have shape (batch, time), got {tuple(idx.shape)}")
    if idx.numel():
        low, high = (bound.item() for bound in idx.aminmax())
        if low < 0 or high >= vocab_size:
            raise ValueError(f"{name} must lie in [0, {vocab_size}), found values from {low} to {high}")


def preset(name: str, **overrides) -> GPTConfig:
    """The config of a named preset (`nano`, `mini`, `full`), with any field overridden."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {list(PRESETS)}")
    return replace(PRESETS[name], **overrides)


def describe_presets() -> str:
    """A table of the presets and their parameter counts (models built on the meta device: no memory)."""
    lines = [f"{'preset':<6} {'layers':>6} {'heads':>5} {'kv':>3} {'width':>5} {'params':>10} {'non-embedding':>14}"]
    for name, config in PRESETS.items():
        with torch.device("meta"):
            model = GPT(config)
        lines.append(
            f"{name:<6} {config.n_layer:>6} {config.n_head:>5} {config.n_kv_head:>3} {config.n_embd:>5} "
            f"{model.num_parameters():>10,} {model.num_parameters(embedding=False):>14,}"
        )
    return "\n".join(lines)
