"""Training: one loop for a CPU process, one GPU, and many GPUs on many nodes under torchrun.

`ratlm train` with no arguments trains the `rat-small` preset on the embedded Shakespeare corpus
(byte-level) for a few CPU minutes, reports validation loss against a unigram model, saves a model
directory and prints a sample. With `--data` (shards from `ratlm tokenize`) the same loop runs the
paper's pretraining: FSDP2 or DDP, bf16 with fp32 master weights, gradient accumulation up to a global
batch, activation checkpointing, per-block compile, atomic checkpoints with exact resume, and a JSONL
log with tokens/s and MFU. See docs/training.md.

The loss of a step is the sum of token losses over the whole global batch divided by its number of
counted targets, so any split into ranks and micro-batches gives the same loss and gradients.
"""

from __future__ import annotations

import dataclasses
import json
import math
import signal
import threading
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from . import distributed as pdist
from .config import ModelConfig, preset
from .distributed import resolve_device
from .loader import IGNORE_INDEX, TokenSource, WindowLoader, to_batch
from .metrics import H100_BF16_TFLOPS, RunLog, flops_per_token, peak_memory_gib
from .model import LanguageModel
from .shards import DataError, load_manifest
from .tokenizer import Tokenizer, load_tokenizer

__all__ = ["IGNORE_INDEX", "TrainConfig", "DivergedError", "recipe", "resolve_device", "train"]

PRECISIONS = ("auto", "bf16", "fp32")


@dataclass
class TrainConfig:
    preset: str = "rat-small"  # model preset (see ratlm.config.PRESETS)
    out: str = "runs/rat-small"  # run folder: log, checkpoints/, and the model files written at the end
    # data
    data: str | None = None  # folder of `ratlm tokenize` shards (None: the embedded Shakespeare corpus)
    valid_data: str | None = None  # shards for validation (the embedded corpus brings its own split)
    tokenizer: str | None = None  # None: the data folder's own tokenizer, or "byte" for the embedded corpus
    shuffle: bool = True  # random window order (False: the stream's order)
    # batch and length of the run
    seq_len: int = 256
    batch_size: int = 16  # sequences per optimizer step, over all ranks (the global batch)
    global_batch_tokens: int | None = None  # if set, batch_size = global_batch_tokens // seq_len
    micro_batch: int | None = None  # sequences per forward on one rank (None: batch_size / ranks)
    max_steps: int = 300
    train_tokens: int | None = None  # if set, max_steps = train_tokens // tokens per step
    stop_at: int | None = None  # leave after this step with a checkpoint, as if interrupted
    # optimiser: AdamW, linear warmup, cosine to min_lr, clipping
    lr: float = 2e-3  # peak learning rate
    min_lr: float = 1e-5  # end of the cosine
    warmup: float = 0.05  # fraction of max_steps spent warming up linearly
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    # parallelism and speed
    parallel: str = "auto"  # auto (none on 1 rank, DDP below 100M parameters, else FSDP2), none, ddp, fsdp
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU), bf16 (fp32 master weights), fp32
    activation_checkpointing: bool = False  # recompute each block in the backward
    compile: bool = False  # torch.compile each block
    # checkpoints
    ckpt_every: int | None = None  # steps between checkpoints (None: 1000 with --data, 0 = never otherwise)
    keep_checkpoints: int = 3
    ckpt_format: str = "dcp"  # dcp (sharded, reshardable) or full (one file written by rank 0)
    resume: str = "auto"  # auto (newest checkpoint of OUT if any), never, or a checkpoint/run folder
    # evaluation, logging, sample
    eval_every: int = 100  # steps between quick validation estimates (0: only at the end)
    eval_batches: int = 4  # global batches per quick estimate
    final_eval_tokens: int | None = None  # validation tokens in the final evaluation (None: all of them)
    tensorboard: bool = False  # also log to OUT/tensorboard
    peak_tflops: float = H100_BF16_TFLOPS  # per-GPU peak for MFU
    device: str = "auto"  # auto, cpu, cuda, cuda:N (under torchrun: this rank's GPU)
    seed: int = 0
    sample_prompt: str = "ROMEO.\n"
    sample_tokens: int | None = None  # None: 300 on the embedded corpus, 0 with --data

    def __post_init__(self) -> None:
        for name in ("seq_len", "batch_size", "max_steps", "keep_checkpoints", "eval_batches"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("eval_every", "ckpt_every", "sample_tokens"):
            if (getattr(self, name) or 0) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.warmup <= 1:
            raise ValueError(f"warmup is a fraction of max_steps, between 0 and 1, got {self.warmup}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")


# The paper's 1.3B pretraining (FineWeb-Edu, 100B tokens, 4K context); the global batch of 2^20
# tokens is this project's default, pick yours with --global-batch-tokens.
PAPER_RECIPE = dict(
    lr=8e-4,
    min_lr=1e-6,
    warmup=0.05,
    weight_decay=0.1,
    beta1=0.9,
    beta2=0.95,
    grad_clip=1.0,
    seq_len=4096,
    global_batch_tokens=1 << 20,
    micro_batch=4,
    train_tokens=100_000_000_000,
    eval_every=1000,
    eval_batches=1,
)


class DivergedError(FloatingPointError):
    """The loss or gradient norm became NaN/inf; the weights of that step were not applied."""


def recipe(preset_name: str) -> TrainConfig:
    """Defaults for a preset: the paper's optimiser and batch for the 1.3B models, the demo's otherwise."""
    cfg = TrainConfig(preset=preset_name, out=f"runs/{preset_name}")
    if preset_name.endswith("-1.3b"):
        cfg = dataclasses.replace(cfg, **PAPER_RECIPE)
    return cfg


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to cfg.lr, then cosine decay to cfg.min_lr at max_steps."""
    warmup = max(1, round(cfg.warmup * cfg.max_steps))
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, cfg.max_steps - warmup))
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


def encode_documents(docs: list[str], tokenizer: Tokenizer) -> np.ndarray:
    """Concatenate documents into one token array, each followed by EOS (the reference convention)."""
    eos = [] if tokenizer.eos_id is None else [tokenizer.eos_id]
    dtype = np.uint16 if tokenizer.vocab_size <= 65536 else np.uint32
    return np.concatenate([np.asarray(ids + eos, dtype=dtype) for ids in tokenizer.encode_batch(docs)])


def lm_loss(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, reduction: str = "mean"
) -> torch.Tensor:
    logits = model(x)
    return F.cross_entropy(
        logits.flatten(0, 1).float(), y.flatten(), ignore_index=IGNORE_INDEX, reduction=reduction
    )


def unigram_loss(train: np.ndarray, valid: np.ndarray, vocab_size: int) -> float:
    """Cross-entropy (nats per token) of the validation tokens under add-one unigram frequencies of train."""
    counts = np.bincount(train, minlength=vocab_size).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return float(-logp[valid].mean())


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW; matrices (projections, the tied embedding) are decayed, vectors (norms, gate biases) not."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))


def load_data(cfg: TrainConfig) -> tuple[Tokenizer, TokenSource, TokenSource | None]:
    """Tokenizer, training stream and optional validation stream."""
    if cfg.data is None:
        from .corpus import load_split

        tokenizer = load_tokenizer(cfg.tokenizer or "byte")
        if tokenizer.eos_id is None:
            raise DataError(f"tokenizer {tokenizer.describe()} has no EOS token to end the documents with")
        train_docs, valid_docs = load_split()
        train = encode_documents(train_docs, tokenizer)
        valid = encode_documents(valid_docs, tokenizer)
        return (
            tokenizer,
            TokenSource.from_array(
                train, tokenizer.eos_id, tokenizer.vocab_size, "Shakespeare (train split)"
            ),
            TokenSource.from_array(valid, tokenizer.eos_id, tokenizer.vocab_size, "Shakespeare (validation)"),
        )
    manifests = {folder: load_manifest(folder) for folder in (cfg.data, cfg.valid_data) if folder}
    try:
        tokenizer = load_tokenizer(cfg.tokenizer or cfg.data)
    except FileNotFoundError as e:
        raise DataError(f"no tokenizer for {cfg.data}: {e}; pass --tokenizer") from e
    for folder, manifest in manifests.items():
        # the EOS id ends documents and the vocabulary bounds the ids: both must be the data's own
        if (manifest["eos_id"], manifest["vocab_size"]) != (tokenizer.eos_id, tokenizer.vocab_size):
            raise DataError(
                f"{folder} was tokenized with {manifest['tokenizer']}, but the tokenizer is "
                f"{tokenizer.describe()}; pass the --tokenizer the data was made with"
            )
    train = TokenSource.from_directory(cfg.data)
    valid = TokenSource.from_directory(cfg.valid_data) if cfg.valid_data else None
    return tokenizer, train, valid


def batch_geometry(cfg: TrainConfig, world: int) -> tuple[int, int, int]:
    """(global batch, micro-batch, accumulation steps) in sequences."""
    batch = cfg.global_batch_tokens // cfg.seq_len if cfg.global_batch_tokens else cfg.batch_size
    micro = cfg.micro_batch or max(1, batch // world)
    if batch < 1 or batch % (world * micro):
        raise ValueError(
            f"the global batch of {batch} sequences must be a multiple of ranks x micro-batch "
            f"= {world} x {micro}"
        )
    return batch, micro, batch // (world * micro)


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    loader: WindowLoader,
    micro: int,
    rt: pdist.Runtime,
    autocast,
    max_windows: int | None = None,
) -> float:
    """Mean loss (nats per counted token) over the loader's consecutive windows, split over the ranks."""
    n = loader.n_windows if max_windows is None else max(1, min(loader.n_windows, max_windows))
    per_rank = math.ceil(n / rt.world)
    mine = np.arange(rt.rank, n, rt.world)
    totals = torch.zeros(2, dtype=torch.float64, device=rt.device)
    model.eval()
    for i in range(0, per_rank, micro):
        # every rank runs the same number and shape of forwards (FSDP gathers are collective):
        # short ranks repeat window 0 with every target ignored
        want, ids = min(micro, per_rank - i), mine[i : i + micro]
        x, y = to_batch(
            loader.windows(np.concatenate([ids, np.zeros(want - len(ids), np.int64)])),
            loader.source.eos_id,
            rt.device,
        )
        y[len(ids) :] = IGNORE_INDEX
        with autocast():
            totals[0] += lm_loss(model, x, y, reduction="sum").double()
        totals[1] += (y != IGNORE_INDEX).sum()
    model.train()
    pdist.all_reduce_sum(totals)
    return float(totals[0] / totals[1].clamp(min=1))


def forward_backward(model: torch.nn.Module, batches: list, rt: pdist.Runtime, autocast) -> torch.Tensor:
    """Accumulate the gradients of this rank's micro-batches (x, y); return the global batch's mean loss.

    Each micro-batch's summed loss is divided by the number of counted targets of the whole global batch
    (all ranks), so the result does not depend on how the batch is split.
    """
    count = pdist.all_reduce_sum(sum((y != IGNORE_INDEX).sum() for _, y in batches).double()).clamp(min=1)
    # DDP and FSDP average gradients over the ranks; multiplying by the world size turns that into a sum
    scale = (rt.world / count).float()
    loss_sum = torch.zeros((), dtype=torch.float64, device=rt.device)
    for i, (x, y) in enumerate(batches):
        with pdist.no_sync(model, i == len(batches) - 1), autocast():
            part = lm_loss(model, x, y, reduction="sum")
        (part * scale).backward()
        loss_sum += part.detach().double()
    return pdist.all_reduce_sum(loss_sum) / count


def clip_gradients(model: torch.nn.Module, max_norm: float) -> float:
    """Clip the global gradient norm (over all shards); returns the norm before clipping."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


class _StopFlag:
    """Set by SIGTERM (e.g. a scheduler's preemption notice): finish the step, checkpoint, leave."""

    def __init__(self):
        self.value, self.previous = False, None
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGTERM, self._set)

    def _set(self, signum, frame) -> None:
        self.value = True

    def restore(self) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)


def train(cfg: TrainConfig, model_config: ModelConfig | None = None) -> dict:
    """Train; returns the metrics that are also written to OUT/train_metrics.json (at the end of the run)."""
    rt = pdist.setup(cfg.device, need_group=cfg.parallel in ("ddp", "fsdp"))
    try:
        return _train(dataclasses.replace(cfg), model_config or preset(cfg.preset), rt)
    finally:
        pdist.teardown(rt)


def _train(cfg: TrainConfig, mcfg: ModelConfig, rt: pdist.Runtime) -> dict:
    # imported here: torch.distributed.checkpoint is slow to import and `ratlm --help` needs this module
    from .trainckpt import Checkpoints, full_model_state, read_state, write_model_files, write_text_synced

    say = print if rt.main else (lambda *a, **k: None)
    tokenizer, train_src, valid_src = load_data(cfg)
    if tokenizer.vocab_size > mcfg.vocab_size:
        raise ValueError(
            f"the tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is {mcfg.vocab_size}"
        )
    global_batch, micro, accum = batch_geometry(cfg, rt.world)
    tokens_per_step = global_batch * cfg.seq_len
    if cfg.train_tokens:
        cfg.max_steps = max(1, cfg.train_tokens // tokens_per_step)
    ckpt_every = cfg.ckpt_every if cfg.ckpt_every is not None else (1000 if cfg.data else 0)
    sample_tokens = cfg.sample_tokens if cfg.sample_tokens is not None else (0 if cfg.data else 300)
    loader = WindowLoader(train_src, cfg.seq_len, cfg.seed, cfg.shuffle)
    # built now so that validation data shorter than one window fails before training, not after it
    valid_loader = WindowLoader(valid_src, cfg.seq_len, shuffle=False) if valid_src is not None else None

    torch.manual_seed(cfg.seed)
    with torch.device(rt.device):
        model = LanguageModel(mcfg)
    n_params, fpt = model.num_params(), flops_per_token(model, cfg.seq_len)
    mode = pdist.resolve_mode(cfg.parallel, rt.world, n_params)
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and rt.device.type == "cuda")
    model = pdist.parallelize(model, mode, rt, bf16, cfg.activation_checkpointing, cfg.compile)
    use_autocast = pdist.needs_autocast(mode, bf16)

    def autocast():
        return torch.autocast(rt.device.type, dtype=torch.bfloat16) if use_autocast else nullcontext()

    optimizer = build_optimizer(model, cfg)

    run_dir = Path(cfg.out)
    ckpts = Checkpoints(run_dir, rt, cfg.keep_checkpoints, cfg.ckpt_format)
    resume_from = pdist.broadcast_object(_resume_path(cfg, ckpts) if rt.main else None)
    ckpts.remove_partial()
    start_step = 0
    if resume_from is not None:
        if read_state(Path(resume_from))["model_config"] != mcfg.to_dict():
            raise ValueError(
                f"the checkpoint {resume_from} holds another model configuration than this run's"
            )
        meta = ckpts.load(Path(resume_from), model, optimizer)
        loader.load_state_dict(meta["loader"])
        start_step = meta["step"]
        say(f"resumed from {resume_from} at step {start_step}")

    gpus = rt.world if rt.device.type == "cuda" else 0
    say(
        f"model {cfg.preset}: {n_params / 1e6:.2f}M parameters, layers {mcfg.layers}; {rt.world} rank(s) on "
        f"{rt.device.type}, parallel {mode}, {'bf16' if bf16 else 'fp32'}; global batch {global_batch} x "
        f"{cfg.seq_len} tokens = {micro} x {accum} accumulation x {rt.world} ranks; {cfg.max_steps} steps\n"
        f"data {train_src.name}: {len(train_src):,} tokens ({tokenizer.describe()}); "
        f"{fpt:.3g} training FLOP/token"
    )

    log = RunLog(run_dir / "train_log.jsonl", start_step, cfg.tensorboard, enabled=rt.main)
    stop = _StopFlag()
    last_step = cfg.max_steps if cfg.stop_at is None else min(cfg.stop_at, cfg.max_steps)
    bar = tqdm(total=cfg.max_steps, initial=start_step, desc="train", dynamic_ncols=True, disable=not rt.main)
    history, step, saved_step, start = [], start_step, start_step, time.perf_counter()

    def save(at: int) -> None:
        meta = {"loader": loader.state_dict(), "model_config": mcfg.to_dict(), "train_config": asdict(cfg)}
        ckpts.save(at, model, optimizer, meta, tokenizer)

    try:
        while step < last_step:
            t0 = time.perf_counter()
            lr = lr_at(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            windows = loader.next_step(global_batch, micro, rt.rank, rt.world)
            mean_loss = forward_backward(
                model, [to_batch(w, train_src.eos_id, rt.device) for w in windows], rt, autocast
            )
            loss, norm = mean_loss.item(), clip_gradients(model, cfg.grad_clip)
            stop_now = pdist.all_reduce_sum(torch.tensor(float(stop.value), device=rt.device)).item() > 0
            if not (math.isfinite(loss) and math.isfinite(norm)):
                latest = ckpts.latest()
                raise DivergedError(
                    f"loss {loss} / grad norm {norm} at step {step + 1}: stopping without applying that "
                    f"step. Last good checkpoint: {latest or 'none (use --ckpt-every)'}; resume from it "
                    "with a lower --lr or check the data."
                )
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            seconds = time.perf_counter() - t0
            record = {
                "step": step,
                "loss": loss,
                "lr": lr,
                "grad_norm": norm,
                "tokens": step * tokens_per_step,
                "step_seconds": seconds,
                "tokens_per_s": tokens_per_step / seconds,
                "mfu": fpt * tokens_per_step / seconds / (cfg.peak_tflops * 1e12 * gpus) if gpus else None,
                "memory_gib": peak_memory_gib(rt.device),
            }
            if valid_loader and cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.max_steps:
                record["val_loss_estimate"] = evaluate(
                    model, valid_loader, micro, rt, autocast, cfg.eval_batches * global_batch
                )
                if rt.main:
                    tqdm.write(f"step {step}: validation loss ~ {record['val_loss_estimate']:.3f}")
            log.write(record)
            history.append(record)
            bar.update(1)
            bar.set_postfix(
                loss=f"{loss:.3f}",
                tok_s=f"{record['tokens_per_s']:.0f}",
                **({"mfu": f"{record['mfu']:.1%}"} if gpus else {}),
            )
            if (ckpt_every and step % ckpt_every == 0) or stop_now or step == cfg.stop_at:
                save(step)
                saved_step = step
            if stop_now:
                say(f"stopped by SIGTERM after step {step}; run the same command again to resume")
                break
    finally:
        bar.close()
        log.close()
        stop.restore()
    train_time = time.perf_counter() - start

    if step < cfg.max_steps:  # stopped early: the checkpoint above is the result
        return {"preset": cfg.preset, "stopped_at": step, "losses": [r["loss"] for r in history]}
    if ckpt_every and saved_step != step:
        save(step)

    val_loss = unigram = None
    if valid_loader is not None:
        max_windows = None if cfg.final_eval_tokens is None else max(1, cfg.final_eval_tokens // cfg.seq_len)
        val_loss = evaluate(model, valid_loader, micro, rt, autocast, max_windows)
        unigram = unigram_loss(
            train_src.read(0, min(len(train_src), 20_000_000)),  # enough for a baseline
            valid_src.read(0, min(len(valid_src), 20_000_000)),
            tokenizer.vocab_size,
        )
    state = full_model_state(model)
    metrics = {
        "preset": cfg.preset,
        "params": n_params,
        "steps": cfg.max_steps,
        "tokens_seen": tokens_per_step * cfg.max_steps,
        "train_seconds": round(train_time, 1),
        "final_train_loss": history[-1]["loss"] if history else None,
        "val_loss": val_loss,
        "val_perplexity": math.exp(val_loss) if val_loss is not None else None,
        "unigram_val_loss": unigram,
        "device": str(rt.device),
        "world_size": rt.world,
        "parallel": mode,
        "train_config": asdict(cfg),
        "losses": [r["loss"] for r in history],
    }
    if rt.main:
        write_model_files(run_dir, mcfg, state, tokenizer)
        write_text_synced(run_dir / "train_metrics.json", json.dumps(metrics, indent=2) + "\n", atomic=True)
        if val_loss is not None:
            print(
                f"validation loss {val_loss:.4f} nats/token (perplexity {math.exp(val_loss):.2f}); "
                f"unigram baseline {unigram:.4f} nats/token; saved to {run_dir}"
            )
        else:
            print(f"saved to {run_dir}")
        if sample_tokens > 0:
            metrics["sample"] = _sample(run_dir, tokenizer, cfg, sample_tokens, rt.device)
    pdist.barrier()
    return metrics


def _resume_path(cfg: TrainConfig, ckpts) -> str | None:
    from .trainckpt import find_checkpoint

    latest = ckpts.latest()
    if cfg.resume == "auto":
        return None if latest is None else str(latest)
    if cfg.resume == "never":
        if latest is not None:
            raise ValueError(
                f"{cfg.out} already holds checkpoints ({latest.name}); resume (--resume auto), "
                "or use another --out"
            )
        return None
    return str(find_checkpoint(cfg.resume))


def _sample(run_dir: Path, tokenizer: Tokenizer, cfg: TrainConfig, n: int, device: torch.device) -> str:
    """A sample from the saved model (the training model may be sharded, compiled or checkpointed)."""
    from .checkpoint import from_pretrained
    from .generation import generate_text

    model = from_pretrained(run_dir, device=device)
    sample = generate_text(
        model, tokenizer, [cfg.sample_prompt], max_new_tokens=n, temperature=0.8, top_k=40, seed=cfg.seed
    )[0]
    print("--- sample ---\n" + cfg.sample_prompt + sample + "\n--------------")
    return sample
