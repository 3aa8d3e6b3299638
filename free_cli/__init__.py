"""free: early-exit decoding for autoregressive language models.

FREE's shallow-deep module with synchronized parallel decoding (Bae, Ko, Yun, EMNLP 2023), the
CALM baselines, lossless drafting (the exit's tokens and prompt lookup, verified by the
synchronized pass), and a lossless mode whose output equals the full model's greedy output.

The library's public names are these; the rest of the package is organised in layers (decoding,
thresholds, records, evaluation, training, cli) whose modules may change.
"""

from .decoding.batching import generate_rows
from .decoding.config import DecodeConfig
from .decoding.costs import StepCosts, decoding_steps
from .decoding.engine import Engine, Generation
from .decoding.loading import load_engine
from .decoding.precision import Precision
from .decoding.stats import Tally
from .errors import ConfigError, FreeError, InputError, ModelLoadError, UnsupportedModelError
from .records.stream import load_prompts, prompt_of

__version__ = "0.1.0"

__all__ = [
    "DecodeConfig",
    "Engine",
    "Generation",
    "Precision",
    "StepCosts",
    "Tally",
    "decoding_steps",
    "generate_rows",
    "load_engine",
    "load_prompts",
    "prompt_of",
    "ConfigError",
    "FreeError",
    "InputError",
    "ModelLoadError",
    "UnsupportedModelError",
    "__version__",
]
