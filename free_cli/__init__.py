"""free: early-exit decoding for autoregressive language models.

FREE's shallow-deep module with synchronized parallel decoding (Bae, Ko, Yun, EMNLP 2023), the
CALM baselines, and a lossless mode whose output equals the full model's greedy output.
"""

from .decoding.config import DecodeConfig
from .decoding.engine import Engine, Generation
from .errors import ConfigError, FreeError, InputError, ModelLoadError, UnsupportedModelError

__version__ = "0.1.0"

__all__ = [
    "DecodeConfig",
    "Engine",
    "Generation",
    "ConfigError",
    "FreeError",
    "InputError",
    "ModelLoadError",
    "UnsupportedModelError",
    "__version__",
]
