"""The decoder: pure torch, no DeepSpeed."""

from loretta.model.attention import BACKENDS, AttentionBackendError, resolve_backend
from loretta.model.config import DecoderConfig
from loretta.model.decoder import Decoder, KVCache

__all__ = [
    "BACKENDS",
    "AttentionBackendError",
    "Decoder",
    "DecoderConfig",
    "KVCache",
    "resolve_backend",
]
