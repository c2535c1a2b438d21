"""Convert a checkpoint of the reference RAT code (CLAIRE-Labo/RAT) into a ratlm model directory (SPEC §3).

The reference trainer writes `torch.save({"task", "config", "step", "optimizer", "lr_scheduler",
"resume_kwargs"})`, with the run config as an `easydict.EasyDict`. We read it with torch's weights-only
unpickler, so nothing in the file can run code, and let a local stand-in that builds plain dicts take
EasyDict's place, so that the easydict package is not needed.
"""

from __future__ import annotations

import pickle
import re
from collections import OrderedDict
from pathlib import Path

import torch
from torch import Tensor

from .checkpoint import CheckpointError, check_state_dict, save_pretrained
from .config import ConfigError, ModelConfig
from .model import LanguageModel

SKIPPED_ENTRIES = ("optimizer", "lr_scheduler", "resume_kwargs")  # training state: not needed to run
MIXERS = {"rat": "rat", "attention": "attn", "local_attention": "swa", "rnn": "rnn"}
POSITIONS = {"rope": "rope", "interrope": "rope", "rope_interrope": "rope", "empty": "nope"}
BACKBONES = ("sequence", "sequence_interleave")
DTYPES = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
}
HEAD_KEY = "head.lm_head.weight"
_TOP_KEYS = {"embedding.wte.weight": "embed.weight", "backbone.ln.weight": "norm.weight"}
_LAYER_KEY = re.compile(r"backbone\.layers\.(\d+)\.(seq_layer|hidden_layer)\.(.+)")
_MIXER_PARAMS = {
    "input_norm.weight": "norm.weight",
    "in_proj.weight": "in_proj.weight",
    "out_proj.weight": "out_proj.weight",
    "gate_bias": "gate_bias",
}
_FFN_PARAMS = {"ln.weight": "norm.weight", "fc1.weight": "fc1.weight", "fc2.weight": "fc2.weight"}
# The reference's FFN config key for the hidden width is not documented; fc1's shape is authoritative
# and these names, when present, are only cross-checked against it.
_FFN_WIDTH_KEYS = ("d_ffn", "d_hidden", "hidden_dim", "d_inner")


class _EasyDict:
    """Stands in for easydict.EasyDict while unpickling.

    Recent torch lets its weights-only unpickler fill only exact dict types (dict, OrderedDict), so
    "constructing" one yields an OrderedDict. The state EasyDict pickles after its items (an attribute
    mirror of them) lands in that OrderedDict's __dict__, and `_plain` drops it.
    """

    def __new__(cls, *args, **kwargs) -> OrderedDict:
        return OrderedDict()


# torch 2.5 keys allow-listed classes by their own __module__ and __name__ (2.6+ also accepts
# (class, "module.Name") pairs), so on old versions a subclass claiming the pickled name does the job.
_DisguisedEasyDict = type("EasyDict", (_EasyDict,), {"__module__": "easydict", "__qualname__": "EasyDict"})
_NAMED_GLOBALS = torch.__version__ >= "2.6"


def _allowed_globals() -> list:
    return [(_EasyDict, "easydict.EasyDict")] if _NAMED_GLOBALS else [_DisguisedEasyDict]


def load_official(path: str | Path) -> tuple[dict[str, Tensor], dict]:
    """The state dict (`_orig_mod.` segments removed) and the run config (plain nested dicts) of a
    reference checkpoint, read without executing pickled code and without the easydict package."""
    ckpt = _read_checkpoint(path)
    return _state_of(ckpt, path), _config_of(ckpt, path)


def _read_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist")
    if not path.is_file():
        raise CheckpointError(f"{path} is not a file; expected the .pth file the reference trainer saves")
    with open(path, "rb") as f:
        head = f.read(16)
    is_zip = head.startswith(b"PK\x03\x04")  # torch.save's default format; 0x80 starts the legacy one
    if not is_zip and head[8:9] == b"{":  # safetensors: an 8-byte header length, then JSON
        raise CheckpointError(
            f"{path} is a safetensors file, not a torch.save checkpoint of the reference code"
        )
    if not is_zip and not head.startswith(b"\x80"):
        raise CheckpointError(f"{path} is not a torch checkpoint (it starts with {head[:8]!r})")
    try:
        with torch.serialization.safe_globals(_allowed_globals()):
            # mmap leaves the optimizer state (twice the model's size) on disk: it is never read
            ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL (\S+)", str(e)) or re.search(r"unrecognized function (\S+)", str(e))
        what = f"the pickled global {found.group(1)}" if found else "pickled data other than plain values"
        raise CheckpointError(
            f"{path}: refused to load {what}; only tensors, plain containers and easydict.EasyDict are "
            f"accepted, and nothing in the file was executed ({str(e).splitlines()[-1][:200]})"
        ) from None
    except (RuntimeError, EOFError, ValueError, OSError) as e:
        raise CheckpointError(f"{path} is not a readable torch checkpoint: {e}") from e
    if not isinstance(ckpt, dict):
        raise CheckpointError(
            f"{path} holds a {type(ckpt).__name__}, not the reference trainer's checkpoint dict"
        )
    return ckpt


def _state_of(ckpt: dict, path) -> dict[str, Tensor]:
    state = ckpt.get("task")
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} has no 'task' state dict (entries: {sorted(map(str, ckpt))})")
    bad = [k for k, v in state.items() if not isinstance(k, str) or not isinstance(v, Tensor)]
    if bad:
        raise CheckpointError(f"{path}: 'task' must map names to tensors; bad entries {bad[:5]}")
    return _strip_compile(state)


def _config_of(ckpt: dict, path) -> dict:
    config = ckpt.get("config")
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} has no 'config' entry, so its architecture is unknown")
    return _plain(config)


def _plain(obj):
    """EasyDict stand-ins (OrderedDicts here) become plain dicts, recursively."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_plain(v) for v in obj)
    return obj


def _strip_compile(state: dict[str, Tensor]) -> dict[str, Tensor]:
    out = {}
    for key, value in state.items():
        name = key.replace("_orig_mod.", "")
        if name in out:
            raise CheckpointError(
                f"tensor {name!r} appears twice once torch.compile's '_orig_mod.' is removed"
            )
        out[name] = value
    return out


def config_from_official(cfg: dict, state: dict[str, Tensor] | None = None) -> ModelConfig:
    """Our ModelConfig for a reference run config (`config["model"]`), cross-checked against the
    (reference-named) state dict when given; fields absent from the config are read from its shapes."""
    state = _strip_compile(state) if state is not None else {}
    model = _section(cfg, "model", "config")
    backbone = _section(model, "backbone", "config.model")
    embedding = model.get("embedding") or {}
    bb = "config.model.backbone"
    if backbone.get("ln", "rmsnorm") != "rmsnorm" or backbone.get("bias", False):
        raise CheckpointError(
            f"{bb}: only ln 'rmsnorm' and bias false are supported, got "
            f"ln {backbone.get('ln')!r}, bias {backbone.get('bias')!r}"
        )
    emb = state.get("embedding.wte.weight")
    vocab = _agree(
        "config.model.embedding.vocab_size",
        embedding.get("vocab_size"),
        None if emb is None else emb.shape[0],
    )
    d_model = _agree(f"{bb}.d_model", backbone.get("d_model"), None if emb is None else emb.shape[1])
    found = {int(m.group(1)) for k in state if (m := _LAYER_KEY.fullmatch(k))}
    n_layers = _agree(f"{bb}.num_layers", backbone.get("num_layers"), max(found) + 1 if found else None)

    cells = _cell_cycle(backbone)
    mixers = [_mixer_name(cell, where) for where, cell in cells]
    pattern = [mixers[i % len(mixers)] for i in range(n_layers)]
    fields: dict = {}
    for (where, cell), mixer in zip(cells, mixers, strict=True):
        if cell.get("d_model", d_model) != d_model:
            raise CheckpointError(f"{where}.d_model is {cell['d_model']} but the model width is {d_model}")
        if mixer != "rnn":
            _set(fields, "n_heads", _heads(cell, where, d_model), where)
        if mixer == "rat":
            _set(fields, "chunk_size", _int(cell, "chunk_size", where), where)
            if cell.get("ngroups") is not None:
                _set(fields, "n_groups", _int(cell, "ngroups", where), where)
        if mixer == "swa":
            _set(fields, "window", _int(cell, "window_size", where, low=0), where)
        if mixer == "rnn" and cell.get("seq_len") is not None:
            _set(fields, "context", _int(cell, "seq_len", where, low=2), where)
    n_heads = fields.setdefault("n_heads", 1)  # an RNN has no heads; 1 keeps the config valid
    if "rat" in pattern:
        fields["n_groups"] = _rat_groups(state, pattern, d_model, n_heads, fields.get("n_groups"))
    fields.setdefault("context", _context(cfg))
    position, rope_base = _position(embedding, pattern, fields, d_model // n_heads)
    d_ffn = _ffn_width(backbone.get("hidden_cell") or {}, state)
    try:
        return ModelConfig(
            vocab_size=vocab,
            d_model=d_model,
            n_layers=n_layers,
            layers=",".join(mixers),
            d_ffn=d_ffn,
            position=position,
            rope_base=rope_base,
            **fields,
        )
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"the reference config does not give a valid ratlm config: {e}") from e


def _section(parent: dict, key: str, where: str) -> dict:
    value = parent.get(key) if isinstance(parent, dict) else None
    if not isinstance(value, dict):
        raise CheckpointError(f"{where}.{key} is missing or not a mapping")
    return value


def _agree(field: str, from_config, from_shape):
    """The config value, else the one read from tensor shapes; both present must agree."""
    if from_config is None and from_shape is None:
        raise CheckpointError(f"{field} is missing and cannot be read from the weights")
    if from_config is not None and (not isinstance(from_config, int) or isinstance(from_config, bool)):
        raise CheckpointError(f"{field} must be an integer, got {from_config!r}")
    if from_config is not None and from_shape is not None and from_config != from_shape:
        raise CheckpointError(f"{field} is {from_config} but the weights say {from_shape}")
    return from_config if from_config is not None else int(from_shape)


def _int(cell: dict, key: str, where: str, low: int = 1) -> int:
    value = cell.get(key)
    if value is None:
        raise CheckpointError(f"{where}.{key} is missing; the weights do not tell it")
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise CheckpointError(f"{where}.{key} must be an integer >= {low}, got {value!r}")
    return value


def _set(fields: dict, name: str, value: int, where: str) -> None:
    """ratlm has one value per field for all layers: layers that disagree cannot be represented."""
    if fields.setdefault(name, value) != value:
        raise CheckpointError(
            f"{where} sets {name} {value}, another layer {fields[name]}; ratlm needs one value"
        )


def _cell_cycle(backbone: dict) -> list[tuple[str, dict]]:
    """(config path, mixer config) per position of the repeating layer pattern."""
    bb = "config.model.backbone"
    name = backbone.get("_name_", "sequence")
    if name == "sequence":
        return [(f"{bb}.seq_cell", _section(backbone, "seq_cell", bb))]
    if name == "sequence_interleave":
        step = backbone.get("interleave_step", 2)
        if not isinstance(step, int) or isinstance(step, bool) or step < 1:
            raise CheckpointError(f"{bb}.interleave_step must be an integer >= 1 (usually 2), got {step!r}")
        # the reference puts seq_cell1 at layers i % step == 0 and seq_cell everywhere else
        first = (f"{bb}.seq_cell1", _section(backbone, "seq_cell1", bb))
        return [first] + [(f"{bb}.seq_cell", _section(backbone, "seq_cell", bb))] * (step - 1)
    raise CheckpointError(f"{bb}._name_ is {name!r}; allowed: {', '.join(BACKBONES)}")


def _mixer_name(cell: dict, where: str) -> str:
    name = cell.get("_name_")
    if name not in MIXERS:
        raise CheckpointError(f"{where}._name_ is {name!r}; allowed: {', '.join(MIXERS)}")
    return MIXERS[name]


def _heads(cell: dict, where: str, d_model: int) -> int:
    heads, width = cell.get("num_head"), cell.get("d_head")
    if heads is None and width is None:
        raise CheckpointError(f"{where} gives neither num_head nor d_head")
    for key, value in (("num_head", heads), ("d_head", width)):
        if value is not None and (not isinstance(value, int) or value < 1 or d_model % value):
            raise CheckpointError(
                f"{where}.{key} must be a positive divisor of d_model {d_model}, got {value!r}"
            )
    if heads is not None and width is not None and heads * width != d_model:
        raise CheckpointError(f"{where}: num_head {heads} x d_head {width} != d_model {d_model}")
    return heads if heads is not None else d_model // width


def _rat_groups(state: dict, pattern: list[str], d_model: int, n_heads: int, configured: int | None) -> int:
    """G from in_proj's width 3D + 2·G·d, checked against the config's ngroups when both are known."""
    layer = pattern.index("rat")
    proj = state.get(f"backbone.layers.{layer}.seq_layer.in_proj.weight")
    if proj is None:
        if configured is None:
            raise CheckpointError(
                "config ngroups of the RAT layers is missing and no in_proj weight shows it"
            )
        return configured
    head_dim, rows = d_model // n_heads, proj.shape[0]
    groups, rest = divmod(rows - 3 * d_model, 2 * head_dim)
    if rest or groups < 1:
        raise CheckpointError(
            f"RAT layer {layer}: in_proj has {rows} rows, not 3·D + 2·G·d with D={d_model}, d={head_dim}"
        )
    if configured is not None and configured != groups:
        raise CheckpointError(
            f"config ngroups is {configured} but layer {layer}'s in_proj width implies {groups}"
        )
    return groups


def _context(cfg: dict) -> int:
    for section in ("data", "trainer"):
        value = (cfg.get(section) or {}).get("seq_len")
        if isinstance(value, int) and not isinstance(value, bool) and value >= 2:
            return value
    return ModelConfig.context


def _position(embedding: dict, pattern: list[str], fields: dict, head_dim: int) -> tuple[str, float]:
    pe = embedding.get("pe") or {}
    name = pe.get("_name_")
    where = "config.model.embedding.pe"
    if name not in POSITIONS:
        raise CheckpointError(f"{where}._name_ is {name!r}; allowed: {', '.join(POSITIONS)}")
    # ratlm rotates RAT layers by chunk index ('interrope') and attention layers by token index ('rope');
    # a pe that leaves out the kind a layer needs is something the reference itself cannot run
    if name == "rope" and "rat" in pattern:
        raise CheckpointError(
            f"{where}._name_ 'rope' has no chunk-index RoPE for the RAT layers; "
            "expected 'interrope' or 'rope_interrope'"
        )
    if name == "interrope" and {"attn", "swa"} & set(pattern):
        raise CheckpointError(
            f"{where}._name_ 'interrope' has no token-index RoPE for the attention layers; "
            "expected 'rope' or 'rope_interrope'"
        )
    if name in ("interrope", "rope_interrope") and pe.get("chunk_size") not in (
        None,
        fields.get("chunk_size"),
    ):
        raise CheckpointError(
            f"{where}.chunk_size {pe['chunk_size']} differs from the RAT chunk_size "
            f"{fields.get('chunk_size')}"
        )
    if name != "empty" and pe.get("dim") not in (None, head_dim):
        raise CheckpointError(
            f"{where}.dim {pe['dim']} != head width {head_dim}; partial RoPE is not supported"
        )
    base = pe.get("base", ModelConfig.rope_base)
    if not isinstance(base, (int, float)) or isinstance(base, bool) or base <= 1:
        raise CheckpointError(f"{where}.base must be a number > 1, got {base!r}")
    return POSITIONS[name], float(base)


def _ffn_width(cell: dict, state: dict) -> int:
    where = "config.model.backbone.hidden_cell"
    if cell.get("_name_", "ffn") != "ffn":
        raise CheckpointError(f"{where}._name_ is {cell.get('_name_')!r}; allowed: ffn")
    fc1 = state.get("backbone.layers.0.hidden_layer.fc1.weight")
    configured = next((cell[k] for k in _FFN_WIDTH_KEYS if cell.get(k) is not None), None)
    return _agree(f"{where} hidden width", configured, None if fc1 is None else fc1.shape[0])


def convert_state_dict(state: dict[str, Tensor], config: ModelConfig) -> dict[str, Tensor]:
    """Reference tensor names -> ours, with the tied head dropped; checked against LanguageModel(config)."""
    state = _strip_compile(state)
    out, unknown = {}, []
    for key, tensor in state.items():
        if key == HEAD_KEY:
            continue
        name = _TOP_KEYS.get(key)
        if (m := _LAYER_KEY.fullmatch(key)) is not None:
            table, part = (_MIXER_PARAMS, "mixer") if m.group(2) == "seq_layer" else (_FFN_PARAMS, "ffn")
            if m.group(3) in table:
                name = f"blocks.{m.group(1)}.{part}.{table[m.group(3)]}"
        if name is None:
            unknown.append(key)
        else:
            out[name] = tensor
    if unknown:
        raise CheckpointError(
            f"unknown tensors in the checkpoint: {unknown[:8]}{' ...' if len(unknown) > 8 else ''}"
        )
    head = state.get(HEAD_KEY)
    embed = out.get("embed.weight")
    if head is not None and (embed is None or head.shape != embed.shape or not torch.equal(head, embed)):
        raise CheckpointError(
            f"{HEAD_KEY} differs from embedding.wte.weight: the head is not tied to the "
            "embedding, which ratlm cannot represent"
        )
    with torch.device("meta"):
        model = LanguageModel(config)
    check_state_dict(model, out, "the reference checkpoint")
    return out


def convert_official(
    src: str | Path, dst: str | Path, tokenizer: str | None = None, dtype: torch.dtype | str | None = None
) -> str:
    """Write the reference checkpoint `src` as a ratlm model directory `dst` (atomically); return a report."""
    target = _dtype(dtype)
    ckpt = _read_checkpoint(src)
    state, cfg = _state_of(ckpt, src), _config_of(ckpt, src)
    config = config_from_official(cfg, state)
    tok = _tokenizer(tokenizer, config.vocab_size) if tokenizer is not None else None
    step = ckpt.get("step")
    config.extra = {
        "converted_from": "CLAIRE-Labo/RAT checkpoint",
        "source_file": Path(src).name,
        "step": step if isinstance(step, int) else None,
    }
    weights = convert_state_dict(state, config)
    source_dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in weights.values()})
    target = target or weights["embed.weight"].dtype
    weights = _unshare({k: t.to(target) for k, t in weights.items()})
    with torch.device("meta"):
        model = LanguageModel(config)
    model.load_state_dict(weights, assign=True)
    written = save_pretrained(model, dst, tok)
    skipped = [k for k in SKIPPED_ENTRIES if k in ckpt]
    skipped += sorted(str(k) for k in ckpt if k not in ("task", "config", "step", *SKIPPED_ENTRIES))
    lines = [
        f"source: {src} (reference RAT checkpoint, step {step})",
        f"architecture: {config.n_layers} layers, d_model {config.d_model}, vocab {config.vocab_size}, "
        f"ffn {config.d_ffn}, context {config.context}",
        *_describe_layers(config),
        f"positions: {_describe_position(config, cfg)}",
        f"parameters: {model.num_params():,}",
        f"dtype: {', '.join(source_dtypes)} -> {str(target).removeprefix('torch.')}",
        f"skipped entries: {', '.join(skipped) or 'none'}"
        + ("; head.lm_head.weight dropped (tied to the embedding)" if HEAD_KEY in state else ""),
        f"tokenizer: {tok.describe() if tok is not None else 'none (pass --tokenizer to include one)'}",
        f"written: {written}",
    ]
    return "\n".join(lines)


def _describe_layers(config: ModelConfig) -> list[str]:
    heads = f"{config.n_heads} heads of {config.head_dim}"
    what = {
        "rat": f"RAT, chunk {config.chunk_size}, {config.n_groups} q/k groups, {heads}",
        "attn": f"attention, {heads}",
        "swa": f"sliding-window attention, window {config.window}, {heads}",
        "rnn": "gated RNN",
    }
    pattern = config.pattern
    lines = []
    for mixer in dict.fromkeys(pattern):
        idx = [i for i, m in enumerate(pattern) if m == mixer]
        shown = ", ".join(map(str, idx)) if len(idx) <= 6 else f"{idx[0]}, {idx[1]}, ..., {idx[-1]}"
        lines.append(f"  layers {shown}: {what[mixer]} (+ FFN)")
    return lines


def _describe_position(config: ModelConfig, cfg: dict) -> str:
    pe = cfg["model"]["embedding"]["pe"]["_name_"]
    if config.position == "nope":
        return f"none (NoPE; reference pe {pe!r})"
    return (
        f"RoPE base {config.rope_base:g}, chunk index in RAT, token index in attention (reference pe {pe!r})"
    )


def _dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise CheckpointError(f"dtype {dtype!r} is not supported; allowed: {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _unshare(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Copy tensors that share memory with an earlier one: safetensors refuses to write aliased tensors."""
    seen: set[tuple[int, int]] = set()
    out = {}
    for key, tensor in state.items():
        ident = (tensor.untyped_storage().data_ptr(), tensor.untyped_storage().nbytes())
        out[key] = tensor.clone() if ident in seen else tensor
        seen.add(ident)
    return out


def _tokenizer(spec: str, vocab_size: int):
    from .tokenizer import load_tokenizer

    try:
        tok = load_tokenizer(spec)
    except (OSError, ValueError, ImportError) as e:
        raise CheckpointError(f"tokenizer {spec!r}: {e}") from e
    if tok.vocab_size > vocab_size:
        raise CheckpointError(
            f"tokenizer {spec!r} has {tok.vocab_size} tokens but the model only {vocab_size}"
        )
    return tok
