"""Training checkpoints: weights, optimiser, data position, RNG and schedule, so a run resumes exactly.

Layout of RUN/checkpoints/:
    step_00001000/    one checkpoint: DCP shards + .metadata (format "dcp", one file per rank, reshardable
                      to any number of ranks) or state.pt (format "full", written by rank 0), plus
                      train_state.json (step, data position, configs), rng_<rank>.pt and tokenizer/
    latest            the name of the newest complete checkpoint
A checkpoint is written to .tmp-step_N/, renamed to step_N/ once every rank has finished (the rename is
the commit), then `latest` is replaced atomically and all but the newest `keep` are deleted. A crash
at any moment leaves the previous checkpoint intact; leftover .tmp-* folders are removed on the next
start. The run folder must be on a filesystem every rank sees (multi-node: a shared one).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from .checkpoint import CheckpointError, save_pretrained
from .config import ModelConfig
from .distributed import Runtime, barrier
from .model import LanguageModel
from .tokenizer import Tokenizer, load_tokenizer

CKPT_DIR = "checkpoints"
LATEST = "latest"
STATE_FILE = "train_state.json"
FULL_FILE = "state.pt"
FORMATS = ("dcp", "full")
_STEP_DIR = re.compile(r"step_(\d+)$")


class Checkpoints:
    """Saves and restores training checkpoints under RUN/checkpoints (collective calls: every rank calls)."""

    def __init__(self, run_dir: str | Path, rt: Runtime, keep: int = 3, fmt: str = "dcp"):
        if fmt not in FORMATS:
            raise ValueError(f"checkpoint format must be one of {FORMATS}, got {fmt!r}")
        if keep < 1:
            raise ValueError(f"keep_checkpoints must be >= 1, got {keep}")
        self.root, self.rt, self.keep, self.fmt = Path(run_dir) / CKPT_DIR, rt, keep, fmt

    def latest(self) -> Path | None:
        return latest_checkpoint(self.root)

    def remove_partial(self) -> None:
        """Delete temporary folders of saves that never completed (call before training starts)."""
        if self.rt.main and self.root.is_dir():
            for tmp in self.root.glob(".tmp-*"):
                shutil.rmtree(tmp, ignore_errors=True)
        barrier()

    def save(
        self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, meta: dict, tokenizer: Tokenizer
    ):
        name = f"step_{step:08d}"
        final, tmp = self.root / name, self.root / f".tmp-{name}"
        if self.rt.main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        barrier()
        if self.fmt == "dcp":
            model_sd, optim_sd = get_state_dict(model, optimizer)
            with _quiet_single_process():
                dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp), no_dist=_single())
        else:
            options = StateDictOptions(full_state_dict=True, cpu_offload=True)
            model_sd, optim_sd = get_state_dict(model, optimizer, options=options)
            if self.rt.main:
                _save_synced({"model": model_sd, "optim": optim_sd}, tmp / FULL_FILE)
        _save_synced(rng_state(self.rt.device), tmp / f"rng_{self.rt.rank}.pt")
        if self.rt.main:
            tokenizer.save(tmp / "tokenizer")
            write_text_synced(
                tmp / STATE_FILE, json.dumps({**meta, "step": step, "format": self.fmt}, indent=1)
            )
        barrier()
        if self.rt.main:
            old = None
            if final.exists():  # only when a step is saved twice; keep the old copy until the new is in place
                old = final.with_name(f".old-{name}")
                os.replace(final, old)
            os.replace(tmp, final)
            write_text_synced(self.root / LATEST, name + "\n", atomic=True)
            _sync_dir(self.root)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
            for stale in _step_dirs(self.root)[: -self.keep]:
                shutil.rmtree(stale, ignore_errors=True)
        barrier()
        return final

    def load(self, path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
        """Restore weights, optimiser (resharded to this run's ranks) and this rank's RNG; return metadata."""
        meta = read_state(path)
        if meta["format"] == "dcp":
            model_sd, optim_sd = get_state_dict(model, optimizer)
            state = {"model": model_sd, "optim": optim_sd}
            with _quiet_single_process():
                dcp.load(state, checkpoint_id=str(path), no_dist=_single())
            set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        else:
            full = torch.load(path / FULL_FILE, map_location="cpu", weights_only=True)
            options = StateDictOptions(full_state_dict=True)
            set_state_dict(
                model,
                optimizer,
                model_state_dict=full["model"],
                optim_state_dict=full["optim"],
                options=options,
            )
        rng = path / f"rng_{self.rt.rank}.pt"
        set_rng_state(
            torch.load(rng if rng.exists() else path / "rng_0.pt", weights_only=True), self.rt.device
        )
        return meta


def _single() -> bool:
    """No process group: DCP then reads and writes everything from this one process."""
    return not torch.distributed.is_initialized()


@contextlib.contextmanager
def _quiet_single_process():
    """DCP warns on every single-process call, which is a normal way to run here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def rng_state(device: torch.device) -> dict:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _step_dirs(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not root.is_dir():
        return []
    found = [
        (int(m.group(1)), p)
        for p in root.iterdir()
        if (m := _STEP_DIR.match(p.name)) and (p / STATE_FILE).is_file()
    ]
    return [p for _, p in sorted(found)]


def latest_checkpoint(root: Path) -> Path | None:
    """The checkpoint `latest` names, or else the newest complete one (the pointer is a convenience)."""
    pointer = root / LATEST
    if pointer.is_file():
        named = root / pointer.read_text().strip()
        if (named / STATE_FILE).is_file():
            return named
    steps = _step_dirs(root)
    return steps[-1] if steps else None


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder from a run folder, its checkpoints/ folder or the checkpoint itself."""
    path = Path(path)
    if (path / STATE_FILE).is_file():
        return path
    for root in (path / CKPT_DIR, path):
        found = latest_checkpoint(root)
        if found is not None:
            return found
    raise CheckpointError(
        f"no training checkpoint in {path} (expected RUN, RUN/{CKPT_DIR} or RUN/{CKPT_DIR}/step_N)"
    )


def read_state(path: Path) -> dict:
    try:
        return json.loads((path / STATE_FILE).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path / STATE_FILE} is unreadable: {e}") from e


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's weights on CPU on rank 0 (empty on other ranks); a collective call."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def write_model_files(
    directory: str | Path, config: ModelConfig, state: dict, tokenizer: Tokenizer | None
) -> Path:
    """Write the `save_pretrained` files into an existing folder (a run folder with logs and checkpoints),
    replacing each file atomically rather than the whole folder."""
    directory = Path(directory)
    with torch.device("meta"):
        model = LanguageModel(config)
    model.load_state_dict(state, assign=True)
    staging = directory / ".export"
    save_pretrained(model, staging, tokenizer=tokenizer)
    for f in staging.iterdir():
        os.replace(f, directory / f.name)
    staging.rmdir()
    _sync_dir(directory)
    return directory


def export(source: str | Path, out: str | Path) -> Path:
    """`ratlm export`: a model folder (safetensors, config, tokenizer) from a training checkpoint, on CPU."""
    ckpt = find_checkpoint(source)
    meta = read_state(ckpt)
    config = ModelConfig.from_dict(meta["model_config"])
    with torch.device("meta"):
        model = LanguageModel(config)
    model.to_empty(device="cpu")
    if meta["format"] == "dcp":
        state = model.state_dict()
        with _quiet_single_process():
            dcp.load({"model": state}, checkpoint_id=str(ckpt), no_dist=True)
    else:
        state = torch.load(ckpt / FULL_FILE, map_location="cpu", weights_only=True)["model"]
    model.load_state_dict(state)
    tokenizer = load_tokenizer(ckpt / "tokenizer") if (ckpt / "tokenizer").is_dir() else None
    return save_pretrained(model, out, tokenizer=tokenizer)


def _save_synced(obj, path: Path) -> None:
    torch.save(obj, path)
    _fsync(path)


def write_text_synced(path: Path, text: str, atomic: bool = False) -> None:
    """Write `text` and flush it to disk; with `atomic`, through a temporary file renamed over `path`."""
    target = path.with_name(path.name + ".tmp") if atomic else path
    target.write_text(text)
    _fsync(target)
    if atomic:
        os.replace(target, path)


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _sync_dir(path: Path) -> None:
    """Make renames inside `path` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
