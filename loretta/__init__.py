"""loretta: LoReTTa multimodal pretraining on DeepSpeed ZeRO-3."""

__version__ = "0.1.0"
