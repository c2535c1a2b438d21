"""Checkpoint directories: `model.safetensors` + `config.json` (+ tokenizer files), written atomically."""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import ConfigError, ModelConfig
from .model import LanguageModel

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # names for `dtype`


class CheckpointError(ValueError):
    """A checkpoint directory or file is missing, malformed, or does not fit the model."""


def atomic_directory(directory: str | Path, write: Callable[[Path], None]) -> Path:
    """Run write(tmp) on a fresh temporary directory, then move it to `directory` in one step.

    A crash while writing leaves any previous `directory` untouched; the old version is removed only
    after the new one is complete and in place.
    """
    target = Path(directory).resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists() and not target.is_dir():
        raise CheckpointError(f"{target} exists and is not a directory")
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        write(tmp)
        umask = _umask()
        tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; a saved model should be as readable as any file
        for f in tmp.iterdir():
            if f.is_file():
                f.chmod(0o666 & ~umask)
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        old = None
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_pretrained(model: LanguageModel, directory: str | Path, tokenizer=None) -> Path:
    """Write the model (and optionally its tokenizer) to `directory`, replacing it atomically."""
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}

    def write(tmp: Path) -> None:
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt", "library": "ratlm"})
        model.config.save(tmp / CONFIG_FILE)
        if tokenizer is not None:
            tokenizer.save(tmp)

    return atomic_directory(directory, write)


def load_config(directory: str | Path) -> ModelConfig:
    path = Path(directory) / CONFIG_FILE
    if not Path(directory).is_dir():
        raise CheckpointError(f"model directory {directory} does not exist")
    if not path.is_file():
        raise CheckpointError(
            f"{path} is missing: not a ratlm model directory (see `ratlm convert-official`)"
        )
    try:
        return ModelConfig.load(path)
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"{path}: {e}") from e


def dtype_named(name: str | None) -> torch.dtype | None:
    """The torch dtype a name of DTYPES stands for; None (keep the saved dtype) stays None."""
    if name is not None and name not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    return DTYPES.get(name)


def note_fp32_on_cuda(model: LanguageModel, dtype_given: bool) -> None:
    """For inference entry points: say once that fp32 weights on CUDA miss the fast kernels (cuDNN's chunk
    attention takes bf16/fp16; the fp32 kernels avoid tensor cores) and double the cache."""
    weight = model.embed.weight
    if not dtype_given and weight.is_cuda and weight.dtype == torch.float32:
        warnings.warn(
            "the model's weights are fp32 (as saved): on CUDA, dtype bf16 (`--dtype bf16`) takes the fast "
            "kernels and halves the cache",
            stacklevel=3,
        )


def from_pretrained(directory: str | Path, device=None, dtype: torch.dtype | None = None) -> LanguageModel:
    """Load a model directory written by `save_pretrained` or `ratlm convert-official` (eval mode)."""
    config = load_config(directory)
    path = Path(directory) / WEIGHTS_FILE
    if not path.is_file():
        raise CheckpointError(f"{path} is missing")
    try:
        state = load_file(str(path), device=str(device) if device is not None else "cpu")
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file: {e}") from e
    with torch.device("meta"):
        model = LanguageModel(config)
    check_state_dict(model, state, str(path))
    model.load_state_dict(state, assign=True)
    if dtype is not None:
        model.to(dtype)
    return model.eval()


def check_state_dict(model: torch.nn.Module, state: dict, source: str) -> None:
    """Raise CheckpointError naming every missing, unexpected or wrongly shaped tensor."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in state and state[k].shape != expected[k].shape
    ]
    problems = []
    if missing:
        problems.append(f"missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    if unexpected:
        problems.append(f"unexpected tensors {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
    if wrong:
        problems.append("shape mismatch " + "; ".join(wrong[:5]))
    if problems:
        raise CheckpointError(f"{source} does not fit the configured model: " + ", ".join(problems))
