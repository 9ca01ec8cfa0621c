"""Decoder hyperparameters (Llama/Mistral style)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

AttnBackend = Literal["auto", "eager", "sdpa", "varlen", "flash_attn", "flash_attn_4"]
# the training loss: 'chunked' (fused output projection + cross-entropy in plain torch, no full
# logits), 'torch' (full fp32 logits, the reference), 'cce'/'liger' (library kernels, CUDA);
# 'auto': liger on CUDA when it imports, else 'chunked' (cce adds its gradients in bf16)
LossImpl = Literal["auto", "chunked", "torch", "liger", "cce"]

# how the model runs, not what it computes: a checkpoint may resume with other values
RUNTIME_FIELDS = frozenset({"attn_backend", "loss_impl", "loss_chunk", "compile"})


@dataclass
class DecoderConfig:
    vocab_size: int = (
        0  # 0: taken from the data's vocabulary layout, rounded up to a multiple of 64
    )
    dim: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 0  # 0: same as n_heads (multi-head); fewer: grouped-query attention
    ffn_dim: int = 0  # 0: 8/3 * dim rounded up to multiple_of (Llama's rule)
    multiple_of: int = 64
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    sliding_window: int | None = None  # keys visible to a query, itself included (Mistral)
    tie_embeddings: bool = False
    attn_backend: AttnBackend = "auto"
    init_std: float = 0.02
    dropout: float = 0.0
    loss_impl: LossImpl = "auto"
    loss_chunk: int = 0  # tokens per chunk of the fused loss; 0: from the vocabulary size
    compile: Literal["auto"] | bool = "auto"  # torch.compile each block; 'auto': on CUDA only

    # ---- derived ----------------------------------------------------------------------------
    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def hidden_dim(self) -> int:
        if self.ffn_dim:
            return self.ffn_dim
        h = int(8 * self.dim / 3)
        return self.multiple_of * ((h + self.multiple_of - 1) // self.multiple_of)

    def problems(self, prefix: str = "model") -> list[str]:
        p = []
        if self.vocab_size < 0:
            p.append(f"{prefix}.vocab_size={self.vocab_size}: must be >= 0 (0 = from data)")
        for name in ("dim", "n_layers", "n_heads", "multiple_of"):
            v = getattr(self, name)
            if v < 1:
                p.append(f"{prefix}.{name}={v}: must be >= 1")
        if self.n_heads >= 1 and self.dim % self.n_heads:
            p.append(
                f"{prefix}.dim={self.dim} is not divisible by {prefix}.n_heads={self.n_heads}; "
                "choose dim = n_heads * head_dim"
            )
        elif self.n_heads >= 1 and self.head_dim % 2:
            p.append(
                f"{prefix}.dim/n_heads={self.head_dim}: rotary embeddings need an even head dim"
            )
        if self.n_kv_heads < 0 or (self.n_kv_heads and self.n_heads % self.n_kv_heads):
            p.append(
                f"{prefix}.n_kv_heads={self.n_kv_heads}: must divide n_heads={self.n_heads} "
                "(or be 0 for multi-head attention)"
            )
        if self.ffn_dim < 0:
            p.append(f"{prefix}.ffn_dim={self.ffn_dim}: must be >= 0 (0 = Llama's 8/3 rule)")
        if not self.norm_eps > 0:
            p.append(f"{prefix}.norm_eps={self.norm_eps}: must be > 0")
        if not self.rope_theta > 0:
            p.append(f"{prefix}.rope_theta={self.rope_theta}: must be > 0, e.g. 10000")
        if self.sliding_window is not None and self.sliding_window < 1:
            p.append(
                f"{prefix}.sliding_window={self.sliding_window}: must be >= 1, "
                "or null for full causal attention"
            )
        if not self.init_std > 0:
            p.append(f"{prefix}.init_std={self.init_std}: must be > 0, e.g. 0.02")
        if self.loss_chunk < 0:
            p.append(f"{prefix}.loss_chunk={self.loss_chunk}: must be >= 0 (0 = automatic)")
        if not 0.0 <= self.dropout < 1.0:
            p.append(f"{prefix}.dropout={self.dropout}: must be in [0, 1)")
        return p

    def num_params(self, include_embedding: bool = True) -> int:
        d, L, V, hd = self.dim, self.n_layers, self.vocab_size, self.head_dim
        attn = d * (self.n_heads * hd) + 2 * d * (self.kv_heads * hd) + (self.n_heads * hd) * d
        mlp = 3 * d * self.hidden_dim
        per_layer = attn + mlp + 2 * d
        n = L * per_layer + d  # + final norm
        n += 0 if self.tie_embeddings else V * d  # output head
        return n + (V * d if include_embedding else 0)

    def flops_per_token(self, seq_len: int) -> float:
        """6N + 12·L·d·S (PaLM's appendix B; loretta/train/metrics.py uses it for MFU): N excludes
        the input embedding; no causal discount."""
        n = self.num_params(include_embedding=False)
        if self.tie_embeddings:  # the tied matrix still does the output projection's work
            n += self.vocab_size * self.dim
        return 6.0 * n + 12.0 * self.n_layers * self.n_heads * self.head_dim * seq_len
