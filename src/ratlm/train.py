"""Single-process training loop: AdamW, warmup + cosine, clipping, bf16 autocast on GPU, evaluation.

`ratlm train` with no arguments trains the `rat-small` preset on the embedded Shakespeare corpus
(byte-level) for a few CPU minutes, reports validation loss against a unigram model, saves a model
directory and prints a sample.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from .checkpoint import save_pretrained
from .config import ModelConfig, preset
from .model import LanguageModel
from .tokenizer import Tokenizer, load_tokenizer

IGNORE_INDEX = -100


@dataclass
class TrainConfig:
    preset: str = "rat-small"  # model preset (see ratlm.config.PRESETS)
    out: str = "runs/rat-small"  # model directory written at the end
    max_steps: int = 400
    batch_size: int = 16
    seq_len: int = 256
    lr: float = 2e-3  # peak learning rate
    min_lr: float = 1e-5  # end of the cosine
    warmup: float = 0.05  # fraction of max_steps spent warming up linearly
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    eval_every: int = 100  # steps between quick validation estimates (0: only at the end)
    eval_batches: int = 4  # batches per quick estimate
    final_eval_tokens: int | None = None  # validation tokens in the final evaluation (None: all of them)
    device: str = "auto"  # auto, cpu, cuda, cuda:N
    seed: int = 0
    tokenizer: str = "byte"
    sample_prompt: str = "ROMEO.\n"
    sample_tokens: int = 300


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} was asked for but CUDA is not available; use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda[:N], got {name!r}")
    return device


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to cfg.lr, then cosine decay to cfg.min_lr at max_steps."""
    warmup = max(1, round(cfg.warmup * cfg.max_steps))
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, cfg.max_steps - warmup))
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


def encode_documents(docs: list[str], tokenizer: Tokenizer) -> np.ndarray:
    """Concatenate documents into one token array, each followed by EOS (the reference convention)."""
    eos = tokenizer.eos_id
    dtype = np.uint16 if tokenizer.vocab_size <= 65536 else np.uint32
    parts = []
    for ids in tokenizer.encode_batch(docs):
        parts.append(np.asarray(ids + ([eos] if eos is not None else []), dtype=dtype))
    return np.concatenate(parts)


def make_batch(tokens: np.ndarray, starts: np.ndarray, seq_len: int, eos_id: int | None, device) -> tuple:
    """Inputs and targets [B, seq_len]; the target right after an EOS is ignored (a new document)."""
    window = np.stack([tokens[s : s + seq_len + 1] for s in starts]).astype(np.int64)
    x = torch.from_numpy(window[:, :-1])
    y = torch.from_numpy(window[:, 1:]).clone()
    if eos_id is not None:
        y[x == eos_id] = IGNORE_INDEX
    return x.to(device, non_blocking=True), y.to(device, non_blocking=True)


def random_batches(tokens: np.ndarray, cfg: TrainConfig, eos_id, device, seed: int) -> Iterator[tuple]:
    if len(tokens) < cfg.seq_len + 1:
        raise ValueError(f"seq_len {cfg.seq_len} is longer than the training data ({len(tokens)} tokens)")
    rng = np.random.default_rng(seed)
    while True:
        starts = rng.integers(0, len(tokens) - cfg.seq_len, size=cfg.batch_size)
        yield make_batch(tokens, starts, cfg.seq_len, eos_id, device)


def lm_loss(model: LanguageModel, x: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    logits = model(x)
    return F.cross_entropy(
        logits.flatten(0, 1).float(), y.flatten(), ignore_index=IGNORE_INDEX, reduction=reduction
    )


def autocast(device: torch.device):
    """bf16 autocast on CUDA; fp32 on CPU (where bf16 matmuls are slower than fp32)."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


@torch.no_grad()
def evaluate(
    model: LanguageModel, tokens: np.ndarray, seq_len: int, batch_size: int, eos_id, device, max_batches=None
) -> float:
    """Mean loss (nats per token) over consecutive non-overlapping windows of the token array."""
    model.eval()
    starts = np.arange(0, len(tokens) - seq_len, seq_len)
    if max_batches is not None:
        starts = starts[: max_batches * batch_size]
    total, count = 0.0, 0
    for i in range(0, len(starts), batch_size):
        x, y = make_batch(tokens, starts[i : i + batch_size], seq_len, eos_id, device)
        with autocast(device):
            total += lm_loss(model, x, y, reduction="sum").item()
        count += int((y != IGNORE_INDEX).sum())
    model.train()
    return total / max(count, 1)


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
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=None)


def train(cfg: TrainConfig, model_config: ModelConfig | None = None) -> dict:
    """Train on the embedded corpus; returns the metrics that are also written to OUT/train_metrics.json."""
    from .corpus import load_split
    from .generate import generate_text

    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    tokenizer = load_tokenizer(cfg.tokenizer)
    mcfg = model_config or preset(cfg.preset)
    if tokenizer.vocab_size > mcfg.vocab_size:
        raise ValueError(
            f"the tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is {mcfg.vocab_size}"
        )
    train_docs, valid_docs = load_split()
    train_tokens = encode_documents(train_docs, tokenizer)
    valid_tokens = encode_documents(valid_docs, tokenizer)
    eos = tokenizer.eos_id

    model = LanguageModel(mcfg).to(device)
    optimizer = build_optimizer(model, cfg)
    batches = random_batches(train_tokens, cfg, eos, device, cfg.seed)
    n_params = model.num_params()
    print(
        f"model {cfg.preset}: {n_params / 1e6:.2f}M parameters, layers {mcfg.layers}, on {device}; "
        f"data {len(train_tokens):,} train / {len(valid_tokens):,} valid tokens ({tokenizer.describe()})"
    )

    log = []
    tokens_per_step = cfg.batch_size * cfg.seq_len
    bar = tqdm(range(cfg.max_steps), desc="train", dynamic_ncols=True)
    start = time.perf_counter()
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg)
        x, y = next(batches)
        with autocast(device):
            loss = lm_loss(model, x, y)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss_value = loss.item()
        if not math.isfinite(loss_value):
            raise FloatingPointError(f"loss became {loss_value} at step {step}; lower --lr or check the data")
        elapsed = time.perf_counter() - start
        record = {
            "step": step + 1,
            "loss": loss_value,
            "lr": optimizer.param_groups[0]["lr"],
            "grad_norm": float(grad_norm),
            "tokens_per_s": tokens_per_step * (step + 1) / elapsed,
        }
        if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < cfg.max_steps:
            record["val_loss_estimate"] = evaluate(
                model, valid_tokens, cfg.seq_len, cfg.batch_size, eos, device, cfg.eval_batches
            )
            tqdm.write(f"step {step + 1}: validation loss ~ {record['val_loss_estimate']:.3f}")
        log.append(record)
        bar.set_postfix(loss=f"{loss_value:.3f}", tok_s=f"{record['tokens_per_s']:.0f}")
    train_time = time.perf_counter() - start

    eval_tokens = valid_tokens if cfg.final_eval_tokens is None else valid_tokens[: cfg.final_eval_tokens]
    val_loss = evaluate(model, eval_tokens, cfg.seq_len, cfg.batch_size, eos, device)
    unigram = unigram_loss(train_tokens, valid_tokens, tokenizer.vocab_size)
    out = save_pretrained(model, cfg.out, tokenizer=tokenizer)
    metrics = {
        "preset": cfg.preset,
        "params": n_params,
        "steps": cfg.max_steps,
        "tokens_seen": tokens_per_step * cfg.max_steps,
        "train_seconds": round(train_time, 1),
        "final_train_loss": log[-1]["loss"] if log else None,
        "val_loss": val_loss,
        "val_perplexity": math.exp(val_loss),
        "unigram_val_loss": unigram,
        "device": str(device),
        "train_config": asdict(cfg),
    }
    (out / "train_metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    with open(out / "train_log.jsonl", "w") as f:
        for record in log:
            f.write(json.dumps(record) + "\n")
    print(
        f"validation loss {val_loss:.4f} nats/token (perplexity {math.exp(val_loss):.2f}); "
        f"unigram baseline {unigram:.4f} nats/token; saved to {out}"
    )
    if cfg.sample_tokens > 0:
        sample = generate_text(
            model,
            tokenizer,
            [cfg.sample_prompt],
            max_new_tokens=cfg.sample_tokens,
            temperature=0.8,
            top_k=40,
            seed=cfg.seed,
        )[0]
        print("--- sample ---\n" + cfg.sample_prompt + sample + "\n--------------")
        metrics["sample"] = sample
    return metrics
