"""What the experiment scripts share: a minimal training loop, FLOP/time estimates and a resumable sweep.

Kept independent of `ratlm.train` (a distributed trainer with checkpoints and a resumable data loader): a
sweep needs one short single-device loop, and its recipe stays fixed whatever the trainer does. The only
ratlm APIs used are `LanguageModel`, `ModelConfig` and `model(input_ids) -> logits`.

A sweep is a list of named configurations. Each finished configuration writes OUT/<name>.json, and a later
invocation of the same command skips it, so a sweep too long for one GPU session is finished by running the
same command again. Before starting a configuration the sweep checks that its estimated time still fits in
`--max-minutes`. A configuration that runs out of time saves its training state (model, optimizer, step, log,
data generator) to OUT/<name>.partial.pt and the next invocation continues it from there, so runs longer
than one GPU call finish over several; the first configuration of an invocation is then always started, so
every invocation makes progress.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

if importlib.util.find_spec("ratlm") is None:  # a checkout without `pip install -e .` (e.g. no network)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from ratlm import LanguageModel, ModelConfig

__all__ = ["LanguageModel", "ModelConfig"]  # re-exported: the scripts import ratlm through this module

IGNORE_INDEX = -100

# Planning model of one H200 (`estimate_seconds`): a fixed cost per optimizer step (kernel launches and Python
# work, which dominate models this small), the FLOPs at an assumed sustained bf16 rate, and a fixed cost per
# run. Calibrated on the H200 MQAR check (experiments/results/mqar-check: width 128, 4 layers, 128 x 256
# tokens per step, 8192-way logits at every position, 0.39 TFLOP per step): attention and RAT L=16 both took
# 16.3 ms per step, against 10 ms + 0.39 / 50 s = 17.8 ms planned. The split between the two terms is not
# measured: the rate is kept low (far below the ~990 TFLOP/s dense peak) so that long sequences, where the
# FLOPs dominate, are not underestimated. RAT and the RNN are charged their FLOPs only: on CUDA their scans
# are Triton kernels, and the check measured RAT L=16 exactly as fast as attention.
ASSUMED_TFLOPS = {"small": 50.0, "medium": 100.0}  # d_model < 384, d_model >= 384
STEP_OVERHEAD_S = 0.010  # per optimizer step or evaluation batch


class Deadline(Exception):
    """Raised inside a training loop when the configuration runs out of its time; `resumable` when its state
    was saved for the next invocation."""

    def __init__(self, message: str, resumable: bool = False):
        super().__init__(message)
        self.resumable = resumable


@dataclass
class Resume:
    """Where `train` saves its state when time runs out (and resumes from), and the generator that draws its
    batches (its state is saved too, so a resumed run continues the same data stream).

    The state (OUT/<name>.partial.pt) holds the model, optimizer, step, log, generator state, training
    seconds, the job's params and the log interval; a resumed run with other params, another log interval
    or a generator on another kind of device is refused. A sidecar (OUT/<name>.partial.info, JSON) tells the
    sweep how far the run got without loading the state. The sweep deletes both once the job's result is
    written.
    """

    path: Path  # OUT/<name>.partial.pt
    rng: torch.Generator
    params: dict | None = None  # the job's params

    def save(
        self, model, optimizer, step: int, steps: int, log: list, seconds: float, log_every: int
    ) -> None:
        params = plain(self.params)  # loadable with weights_only
        state = {"step": step, "model": model.state_dict(), "optimizer": optimizer.state_dict(), "log": log,
                 "rng": self.rng.get_state(), "rng_device": self.rng.device.type, "seconds": seconds,
                 "params": params, "log_every": log_every}  # fmt: skip
        tmp = self.path.with_suffix(".tmp")
        torch.save(state, tmp)
        os.replace(tmp, self.path)  # atomic: a crash while saving keeps the previous state
        info = {"step": step, "steps": steps, "seconds": seconds, "params": params}
        write_json(info_path(self.path), info)  # only for planning: a stale or missing one is harmless

    def load(self, model, optimizer, log_every: int) -> tuple[int, list, float]:
        """(step, log, seconds) of the saved state, loaded into model, optimizer and rng."""
        state = torch.load(self.path, map_location="cpu", weights_only=True)  # never runs pickled code
        saved = (state["params"], state["log_every"], state["rng_device"])
        wanted = (plain(self.params), log_every, self.rng.device.type)
        for what, had, want in zip(("params", "log interval", "device type"), saved, wanted, strict=True):
            if had != want:
                raise SystemExit(
                    f"{self.path} was saved with {what} {had}, not {want}: run with the same settings, or "
                    "delete it (and its .partial.info) to start the run again"
                )
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        self.rng.set_state(state["rng"])
        return state["step"], state["log"], state["seconds"]


def plain(value):
    """`value` as it reads back from JSON (tuples as lists): how params are stored and compared."""
    return json.loads(json.dumps(value))


def partial_path(out: Path | str, job_name: str) -> Path:
    return Path(out) / f"{job_name}.partial.pt"


def info_path(partial: Path) -> Path:
    return partial.with_suffix(".info")


def saved_progress(out: Path | str, job_name: str) -> dict | None:
    """The sidecar of a job's saved state ({"step", "steps", "seconds", "params"}), or None."""
    partial = partial_path(out, job_name)
    if not partial.exists() or not info_path(partial).exists():
        return None
    return json.loads(info_path(partial).read_text())


def clear_partial(out: Path | str, job_name: str) -> None:
    partial = partial_path(out, job_name)
    partial.unlink(missing_ok=True)
    info_path(partial).unlink(missing_ok=True)


@dataclass
class OptimConfig:
    steps: int = 1000
    lr: float = 1e-3  # peak learning rate
    min_lr_ratio: float = 0.1  # the cosine ends at lr * min_lr_ratio
    warmup: float = 0.05  # fraction of the steps spent warming up linearly
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0


def lr_at(step: int, cfg: OptimConfig) -> float:
    """Linear warmup to cfg.lr, then cosine decay to cfg.lr * cfg.min_lr_ratio at cfg.steps."""
    warmup = max(1, round(cfg.warmup * cfg.steps))
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, cfg.steps - warmup))
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + 0.5 * (cfg.lr - floor) * (1 + math.cos(math.pi * progress))


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def autocast(device: torch.device):
    """bf16 autocast on CUDA; plain fp32 on CPU."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW (fused on CUDA); matrices (projections, the embedding) are decayed, vectors (norms, gate biases)
    are not."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = all(p.is_cuda for p in model.parameters())  # one kernel per step instead of one per tensor group
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=fused)


def masked_loss(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy over the positions whose target is not IGNORE_INDEX, in fp32 on those rows only."""
    keep = targets != IGNORE_INDEX
    return F.cross_entropy(logits[keep].float(), targets[keep], reduction=reduction)


def train(
    model: torch.nn.Module,
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
    cfg: OptimConfig,
    device: torch.device,
    time_limit_s: float | None = None,
    log_every: int = 50,
    on_log: Callable[[int], dict] | None = None,
    stop: Callable[[dict], bool] | None = None,
    loss_fn: Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    resume: Resume | None = None,
) -> dict:
    """Train for cfg.steps steps on (input_ids, targets) batches; targets use IGNORE_INDEX for "no loss".

    loss_fn(model, input_ids, targets) gives the loss (default: masked_loss of the full logits).

    on_log(step) may return extra numbers (e.g. a validation estimate) that go into that step's log record;
    stop(record) may end training early at a log step (the schedule is not stretched: it is cut).
    Raises Deadline if time_limit_s passes before the last step (checked at log steps). With `resume`, the
    state is saved then (Deadline.resumable) and a later call with the same arguments continues from it;
    the sweep deletes it once the job's result is written. The log's seconds and train_seconds count every
    call's training time.
    Returns {"log": [...], "steps": steps run, "train_seconds": ..., "final_train_loss": ...}.
    """
    model.train()
    optimizer = build_optimizer(model, cfg)
    log, window, first, earlier_s = [], [], 0, 0.0
    if resume is not None and resume.path.exists():
        first, log, earlier_s = resume.load(model, optimizer, log_every)
        print(f"  resuming at step {first} ({earlier_s:.0f} s of training so far) from {resume.path}")
    began = time.perf_counter()
    start = began - earlier_s
    step = first - 1
    for step in range(first, cfg.steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg)
        x, y = next(batches)
        with autocast(device):
            loss = masked_loss(model(x), y) if loss_fn is None else loss_fn(model, x, y)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        window.append(loss.detach())
        if (step + 1) % log_every == 0 or step + 1 == cfg.steps:
            mean_loss = torch.stack(window).mean().item()  # one device sync per log interval
            window = []
            if not math.isfinite(mean_loss):
                raise FloatingPointError(f"training loss became {mean_loss} by step {step + 1}")
            record = {
                "step": step + 1,
                "loss": mean_loss,
                "lr": lr_at(step, cfg),
                "grad_norm": float(grad_norm),
                "seconds": time.perf_counter() - start,
            }
            if on_log is not None:
                record.update(on_log(step + 1))
                model.train()
            log.append(record)
            shown = "  ".join(f"{k} {v:.4g}" for k, v in record.items() if k != "step")
            print(f"  step {step + 1:>6}  {shown}")
            if stop is not None and stop(record):
                break
            if (
                time_limit_s is not None
                and time.perf_counter() - began > time_limit_s
                and step + 1 < cfg.steps
            ):
                message = f"training passed its {time_limit_s:.0f} s limit at step {step + 1}"
                if resume is None:
                    raise Deadline(message)
                resume.save(
                    model, optimizer, step + 1, cfg.steps, log, time.perf_counter() - start, log_every
                )
                raise Deadline(f"{message}; saved to {resume.path}", resumable=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    return {"log": log, "steps": step + 1, "train_seconds": seconds, "final_train_loss": log[-1]["loss"]}


def count_params(cfg: ModelConfig) -> int:
    """Parameters of LanguageModel(cfg), from the layer shapes of SPEC §1-2 (a test checks it against the
    model; building the model, even on the meta device, costs seconds on a loaded CPU)."""
    D, hidden, head = cfg.d_model, cfg.d_ffn, cfg.head_dim
    mixer = {
        "attn": 4 * D * D + D,  # in_proj (v, q, k), out_proj, norm
        "swa": 4 * D * D + D,
        "rnn": 4 * D * D + 2 * D,  # in_proj (z, x, g), out_proj, norm, gate bias
        "rat": D * (3 * D + 2 * cfg.n_groups * head) + D * D + 2 * D,  # in_proj (z, x, g, q, k), ...
    }
    ffn = 2 * D * hidden + D
    return cfg.vocab_size * D + D + sum(mixer[m] + ffn for m in cfg.pattern)


def match_ffn(cfg: ModelConfig, target_params: int, multiple: int = 32) -> ModelConfig:
    """cfg with the FFN width (a multiple of `multiple`) that brings its parameter count closest to target."""
    per_unit = 2 * cfg.d_model * cfg.n_layers  # fc1 and fc2 of every block
    base = count_params(cfg.replace(d_ffn=multiple)) - per_unit * multiple
    d_ffn = max(multiple, round((target_params - base) / per_unit / multiple) * multiple)
    return cfg.replace(d_ffn=d_ffn)


def flops_per_token(cfg: ModelConfig, seq_len: int, train: bool = True, logit_fraction: float = 1.0) -> float:
    """Approximate FLOPs per token of a training step (forward + backward), or of a forward pass.

    Matmul parameters cost 6 FLOPs per token (2 forward, 4 backward); the logits only at the share
    logit_fraction of the positions that are scored (MQAR scores its K queries only). Token mixing is counted
    as this implementation does it on CUDA: causal attention through a fused kernel that skips masked blocks
    (T/2 keys per query on average), sliding-window attention through FlexAttention's block mask (the
    128-key blocks that hold any of the W + 1 keys: W rounded up to 128, plus one), RAT as a dense product
    against all T/L chunk summaries; the recurrences are elementwise and not counted.
    """
    D, T = cfg.d_model, seq_len
    matmul = count_params(cfg) - cfg.d_model * (2 * cfg.n_layers + 1)  # all but norm weights ...
    matmul -= sum(cfg.d_model for m in cfg.pattern if m in ("rat", "rnn"))  # ... and gate biases
    logits = cfg.vocab_size * D  # the tied embedding counts once: as the logit matmul (the lookup is free)
    total = 2.0 * (matmul - logits + logits * logit_fraction)
    swa_keys = min(T, 128 * math.ceil(cfg.window / 128) + 128)
    keys = {"attn": T / 2, "swa": swa_keys, "rat": T / cfg.chunk_size + 1, "rnn": 0.0}
    total += sum(4.0 * keys[m] * D for m in cfg.pattern)  # scores and weighted sum, 2 FLOPs per MAC
    return total * (3.0 if train else 1.0)


def estimate_seconds(
    cfg: ModelConfig,
    seq_len: int,
    train_tokens: float,
    eval_tokens: float = 0.0,
    *,
    steps: int = 0,
    logit_fraction: float = 1.0,
    fixed_s: float = 20.0,
) -> float:
    """Planning estimate of seconds on one H200: ASSUMED_TFLOPS, STEP_OVERHEAD_S per step (and evaluation
    batch) counted in `steps`, and fixed_s for model build, first-call compilation and evaluation set-up."""
    rate = ASSUMED_TFLOPS["small" if cfg.d_model < 384 else "medium"] * 1e12
    flops = flops_per_token(cfg, seq_len, True, logit_fraction) * train_tokens
    flops += flops_per_token(cfg, seq_len, False, logit_fraction) * eval_tokens
    return flops / rate + steps * STEP_OVERHEAD_S + fixed_s


def environment(device: torch.device) -> dict:
    info = {"torch": torch.__version__, "python": platform.python_version(), "device": str(device)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def write_json(path: Path, data: dict) -> None:
    """Write atomically, so an interrupted run never leaves a half-written result that a re-run would skip."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


@dataclass
class Job:
    name: str  # file stem of the result: OUT/<name>.json
    params: dict  # everything that defines the run (stored in the result)
    estimate_s: float  # planning estimate of its GPU time, every one of params["steps"] steps run
    step_s: float = 0.0  # the part of the estimate per training step, for runs that stop early (0: unknown)
    resumable: bool = False  # run_one saves its training state when out of time (see `Resume`)


def measured_ratio(job: Job, result: dict) -> float:
    """Measured / planned time of a finished job. For jobs with a per-step estimate, from its steady-state
    steps (between its first and last log records), so that one-off compilation and warm-up, which later jobs
    of the same shapes do not pay again, do not inflate every later estimate."""
    log = result.get("log") or []
    if job.step_s and len(log) >= 2 and log[-1]["step"] > log[0]["step"]:
        per_step = (log[-1]["seconds"] - log[0]["seconds"]) / (log[-1]["step"] - log[0]["step"])
        return per_step / job.step_s
    return result["wall_seconds"] / planned_seconds(job, result)


def planned_seconds(job: Job, result: dict) -> float:
    """The job's estimate for the steps it ran (result["steps_run"]), to compare with its measured time."""
    if job.step_s and "steps_run" in result and "steps" in job.params:
        return job.estimate_s - (job.params["steps"] - result["steps_run"]) * job.step_s
    return job.estimate_s


def int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def float_list(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def str_list(text: str) -> list[str]:
    return [x for x in text.split(",") if x]


def names_of(choices: Iterable[str]) -> Callable[[str], list[str]]:
    """An argparse type: a comma list of names, each one of `choices`."""
    choices = list(choices)

    def parse(text: str) -> list[str]:
        names = str_list(text)
        unknown = sorted(set(names) - set(choices))
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown {unknown}; choose from {', '.join(choices)}")
        return names

    return parse


def model_size(args: argparse.Namespace) -> dict:
    """The model-shape arguments every script shares, as stored in a job's params."""
    return {k: getattr(args, k) for k in ("d_model", "n_layers", "n_heads", "n_groups", "window")}


def sweep_parser(doc: str) -> argparse.ArgumentParser:
    """A script's parser (its docstring as the description) with the arguments of `run_sweep`."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="directory for the per-configuration JSON results")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    parser.add_argument(
        "--max-minutes", type=float, default=8.5, help="start no configuration that would end past this"
    )
    parser.add_argument("--plan", action="store_true", help="list configurations and estimates only")
    parser.add_argument("--log-every", type=int, default=100, help="steps between training-log records")
    return parser


def same_params(path: Path, job: Job) -> bool:
    return json.loads(path.read_text()).get("params") == plain(job.params)


def run_sweep(jobs: list[Job], run_one: Callable[[Job, float], dict], args: argparse.Namespace) -> int:
    """Run every job whose result does not exist yet, within args.max_minutes; returns how many remain.

    run_one(job, time_limit_s) trains and evaluates one configuration and returns its result dict; it may
    pass `Resume(partial_path(args.out, job.name), generator, job.params)` to `train`, so that a job that
    runs out of time is continued by the next invocation.
    """
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    todo = [job for job in jobs if not (out / f"{job.name}.json").exists()]
    stale = [job.name for job in jobs if job not in todo and not same_params(out / f"{job.name}.json", job)]
    if stale:
        sys.exit(f"{out} holds results of other settings under the same names ({', '.join(stale[:3])}, ...): "
                 "use another --out, or delete them")  # fmt: skip
    # training states saved by earlier invocations: read once (only the job that runs changes its own)
    saved = {job.name: saved_progress(out, job.name) for job in todo}
    stale = [job.name for job in todo if saved[job.name] and saved[job.name]["params"] != plain(job.params)]
    if stale:
        sys.exit(
            f"{out} holds saved training states of other settings under the same names "
            f"({', '.join(stale[:3])}): use another --out, or delete their .partial.* files"
        )
    # the fraction of its steps each job has saved
    done = {name: 0.0 if s is None else min(1.0, s["step"] / max(1, s["steps"])) for name, s in saved.items()}
    left = {job.name: job.estimate_s * (1 - done[job.name]) for job in todo}  # unscaled estimate still to run
    total_min = sum(left.values()) / 60
    print(
        f"{len(jobs)} configurations, {len(jobs) - len(todo)} already done, {len(todo)} to run "
        f"(planning estimate {total_min:.1f} H200 minutes)"
    )
    if args.plan:
        for job in todo:
            resumes = f" (resumes at {done[job.name]:.0%})" if done[job.name] else ""
            print(f"  {job.name:<40} ~{left[job.name] / 60:5.1f} min{resumes}")
        return len(todo)
    budget_s = args.max_minutes * 60
    start = time.perf_counter()
    scale = 1.0  # worst measured / planned time (for the steps run) so far: later estimates are scaled by it
    for i, job in enumerate(todo):
        elapsed = time.perf_counter() - start
        left_s = left[job.name] * scale
        # a resumable first job is started whatever its estimate: it saves what it gets done
        if elapsed + left_s > budget_s and not (i == 0 and job.resumable):
            print(f"INCOMPLETE: {len(todo) - i} configurations left; re-run the same command to continue")
            return len(todo) - i
        print(f"[{i + 1}/{len(todo)}] {job.name} (estimate {left_s / 60:.1f} min)")
        earlier_s = saved[job.name]["seconds"] if saved[job.name] else 0.0  # earlier invocations' training
        began = time.perf_counter()
        try:
            result = {"status": "ok", **run_one(job, max(0.0, budget_s - elapsed))}
        except Deadline as stop:
            # saved, or it did not have the whole budget: a fresh invocation continues or may fit it
            if stop.resumable or elapsed > 0.05 * budget_s:
                print(f"INCOMPLETE: {stop}; re-run the same command to continue")
                return len(todo) - i
            print(f"  timeout: {stop}")
            result = {"status": "timeout", "reason": str(stop)}
        except (torch.cuda.OutOfMemoryError, FloatingPointError) as err:  # too big, or diverged
            # recorded, so that a re-run moves on (delete the file to retry); anything else is a bug: raise
            print(f"  error: {type(err).__name__}: {err}")
            result = {"status": "error", "reason": f"{type(err).__name__}: {err}"}
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        result = {"name": job.name, "params": job.params, **result}
        # this invocation's time, plus the training time of earlier invocations of a resumed job
        result["wall_seconds"] = time.perf_counter() - began + earlier_s
        result["estimate_seconds"] = job.estimate_s
        result["estimate_seconds_for_steps_run"] = planned_seconds(job, result)
        write_json(out / f"{job.name}.json", result)
        clear_partial(out, job.name)  # only now: a crash before the result is written keeps the saved state
        if result["status"] == "ok":
            scale = max(scale, measured_ratio(job, result))
    print("DONE: every configuration has a result")
    return 0


def config_dict(cfg: ModelConfig) -> dict:
    data = asdict(cfg)
    data.pop("extra", None)
    return data
