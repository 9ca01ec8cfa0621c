"""Demo data for LoReTTa: SVL-digits, the paper's speech-vision-language digits experiment
rebuilt from data that installs offline (see loretta/demo/svl_data.py).

Build it with ``python tools/build_svl_digits.py data/svl-digits`` or `build_svl_digits`.
"""

from loretta.demo.svl_data import (
    PRESETS,
    SvlDigits,
    SvlDigitsConfig,
    SvlPaths,
    build_svl_digits,
    image_tokens_to_array,
    svl_config,
    text_tokens_to_string,
)

__all__ = [
    "PRESETS",
    "SvlDigits",
    "SvlDigitsConfig",
    "SvlPaths",
    "build_svl_digits",
    "image_tokens_to_array",
    "svl_config",
    "text_tokens_to_string",
]
