"""The language model: embedding, N x (mixer, FFN), final norm, logits through the tied embedding."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .cache import ModelCache
from .config import MIXERS, ModelConfig
from .mixers import FFN, RAT, RNN, Attention, RMSNorm
from .ops.linear import linear


def make_mixer(name: str, cfg: ModelConfig) -> nn.Module:
    if name == "rat":
        return RAT(cfg)
    if name == "attn":
        return Attention(cfg)
    if name == "swa":
        return Attention(cfg, window=cfg.window)
    if name == "rnn":
        return RNN(cfg)
    raise ValueError(f"mixer must be one of {', '.join(MIXERS)}, got {name!r}")


class Block(nn.Module):
    def __init__(self, name: str, cfg: ModelConfig):
        super().__init__()
        self.mixer = make_mixer(name, cfg)
        self.ffn = FFN(cfg)

    def forward(self, x: Tensor, state=None, *, inplace: bool = False) -> Tensor:
        """The mixer, then the FFN, each with its residual; inplace: x may be overwritten (cached use)."""
        return self.ffn(self.mixer(x, state, inplace=inplace), inplace=inplace)


class LanguageModel(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(Block(name, config) for name in config.pattern)
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        if not any(p.is_meta for p in self.parameters()):
            self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """The paper's init: Linear and Embedding weights N(0, 0.02), norm weights 1, chrono gate biases."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=self.config.init_std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
            elif isinstance(module, (RAT, RNN)):
                module.init_gate_bias()

    def forward(
        self, input_ids: Tensor, cache: ModelCache | None = None, *, last_only: bool = False
    ) -> Tensor:
        """Logits [B, T, vocab] for input_ids [B, T] ([B, 1, vocab] with last_only, all a prefill needs).

        Without a cache this is the full (training) forward. With a cache from `new_cache`, the tokens
        continue where the cache stands (a whole prompt, a piece of one, or one token) and the cache is
        updated in place; the logits equal those of the full forward over everything seen so far. One token
        per sequence takes the decode path, which reads positions on the device: it may be captured in a
        CUDA graph (see `ratlm.generation.DecodeStep`) and serves sequences at different positions.
        """
        self._check_ids(input_ids, cache)
        x = self.embed(input_ids)
        states = [None] * len(self.blocks) if cache is None else cache.layers
        # cached inference adds each residual into x by its GEMM (x is this call's own embedding output),
        # unless hooks could observe the blocks' inputs and outputs (they would all be the same tensor)
        inplace = cache is not None and not torch.is_grad_enabled() and not self._hooked()
        for block, state in zip(self.blocks, states, strict=True):
            x = block(x, state, inplace=inplace)
        if last_only:
            x = x[:, -1:]
        return linear(self.norm(x), self.embed.weight, weight_ready=True)  # a parameter: see ratlm.ops.pdl

    def _hooked(self) -> bool:
        """Whether a forward hook (global, or on a block or anything in it) may see the blocks' tensors.

        Under torch.compile this is not checked (False): the compiled cached forward always adds in place.
        """
        if torch.compiler.is_compiling():
            return False
        hooks = torch.nn.modules.module
        if hooks._global_forward_hooks or hooks._global_forward_pre_hooks:
            return True
        stack: list[nn.Module] = [self.blocks]  # a plain walk: 3x faster than .modules() (40 us at 24 layers)
        while stack:
            module = stack.pop()
            if module._forward_hooks or module._forward_pre_hooks:
                return True
            stack.extend(m for m in module._modules.values() if m is not None)
        return False

    def _check_ids(self, input_ids: Tensor, cache: ModelCache | None) -> None:
        if torch.compiler.is_compiling():
            return  # a compiled step's caller checks it (DecodeStep); guards on host counters would recompile
        if not isinstance(input_ids, Tensor):
            raise TypeError(f"input_ids must be a tensor, got {type(input_ids).__name__}")
        if input_ids.dtype not in (torch.int32, torch.int64) or input_ids.dim() != 2:
            raise TypeError(
                "input_ids must be an int32 or int64 tensor of shape [batch, tokens], got "
                f"{input_ids.dtype} {tuple(input_ids.shape)}"
            )
        if input_ids.shape[1] == 0:
            raise ValueError("input_ids must hold at least one token")
        # reading the ids' range needs a device sync, which a CUDA graph capture cannot take
        if not (input_ids.is_cuda and torch.cuda.is_current_stream_capturing()):
            lo, hi = torch.stack(torch.aminmax(input_ids)).tolist()  # one device sync for both
            if lo < 0 or hi >= self.config.vocab_size:
                bad = lo if lo < 0 else hi
                raise ValueError(f"token id {bad} is outside the vocabulary [0, {self.config.vocab_size})")
        if cache is not None:
            if input_ids.shape[0] != cache.batch_size:
                raise ValueError(f"input_ids has batch {input_ids.shape[0]}, the cache {cache.batch_size}")
            if cache.ragged and input_ids.shape[1] > 1:
                raise ValueError(
                    "the cache's sequences stand at different positions: feed one token per sequence"
                )
            cache.check_room(input_ids.shape[1])

    def new_cache(
        self,
        batch_size: int,
        max_len: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> ModelCache:
        """Preallocate the inference state of every layer for batch_size sequences of up to max_len tokens.

        dtype is the storage type of cached keys/values (default: the parameters' dtype); recurrent
        running states are always fp32. Layers share one RoPE table per kind of position.
        """
        if batch_size < 1 or max_len < 1:
            raise ValueError(f"batch_size and max_len must be >= 1, got {batch_size} and {max_len}")
        param = self.embed.weight
        device = param.device if device is None else device
        dtype = param.dtype if dtype is None else dtype
        tables: dict = {}
        layers = [b.mixer.new_state(batch_size, max_len, device, dtype, tables) for b in self.blocks]
        return ModelCache(layers=layers, batch_size=batch_size, max_len=max_len)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def save_pretrained(self, directory) -> None:
        from .checkpoint import save_pretrained

        save_pretrained(self, directory)

    @classmethod
    def from_pretrained(cls, directory, device=None, dtype=None) -> LanguageModel:
        from .checkpoint import from_pretrained

        return from_pretrained(directory, device=device, dtype=dtype)
