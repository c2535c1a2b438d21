"""transformers classes around `LanguageModel`, reading and writing ratlm's own model directories.

A directory written by `ratlm`'s `save_pretrained` or `ratlm convert-official` loads with
`AutoModelForCausalLM.from_pretrained`, and `RatForCausalLM.save_pretrained` writes that same format:
config.json holds exactly the `ModelConfig` fields plus "model_type": "ratlm", and model.safetensors
the `LanguageModel` tensor names (`embed.weight`, `blocks.{i}...`, `norm.weight`; the logits reuse the
embedding, so there is no head tensor). transformers additionally writes generation_config.json.
"""

from __future__ import annotations

import json
from dataclasses import field, fields

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import GenerationMixin, PreTrainedConfig, PreTrainedModel, initialization
from transformers.modeling_outputs import CausalLMOutputWithPast

from ..config import ModelConfig
from ..mixers import RAT, RNN, RMSNorm
from ..model import LanguageModel
from . import register_auto_classes

_DEFAULT = ModelConfig()
# transformers renamed the generation cache from `past_key_values` to `cache` during v5.
_CACHE = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


class RatConfig(PreTrainedConfig):
    """`ModelConfig`'s fields as a transformers config; its JSON form is ratlm's config.json."""

    model_type = "ratlm"
    attribute_map = {
        "hidden_size": "d_model",
        "num_hidden_layers": "n_layers",
        "num_attention_heads": "n_heads",
    }

    vocab_size: int = _DEFAULT.vocab_size
    d_model: int = _DEFAULT.d_model
    n_layers: int = _DEFAULT.n_layers
    n_heads: int = _DEFAULT.n_heads
    layers: str = _DEFAULT.layers
    chunk_size: int = _DEFAULT.chunk_size
    n_groups: int = _DEFAULT.n_groups
    window: int = _DEFAULT.window
    d_ffn: int = _DEFAULT.d_ffn
    position: str = _DEFAULT.position
    rope_base: float = _DEFAULT.rope_base
    context: int = _DEFAULT.context
    norm_eps: float = _DEFAULT.norm_eps
    init_std: float = _DEFAULT.init_std
    rat_l1_gate_bias: float = _DEFAULT.rat_l1_gate_bias
    extra: dict = field(default_factory=dict)
    tie_word_embeddings: bool = True  # transformers' bookkeeping: the logits use the embedding matrix

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.to_ratlm()  # ModelConfig's validation, with its error messages

    def to_ratlm(self) -> ModelConfig:
        return ModelConfig.from_dict({f.name: getattr(self, f.name) for f in fields(ModelConfig)})

    @classmethod
    def from_ratlm(cls, config: ModelConfig, **kwargs) -> RatConfig:
        return cls(**config.to_dict(), **kwargs)

    def to_json_string(self, use_diff: bool = True) -> str:
        """ratlm's config.json (what `ModelConfig.save` writes), so either library reads the other's files."""
        return json.dumps({"model_type": self.model_type, **self.to_ratlm().to_dict()}, indent=2) + "\n"


class RatCache:
    """A ratlm `ModelCache` in the role of transformers' `Cache`, handed from one generate() step to the next.

    It offers what generate() reads of a cache and no more: there is no cropping or reordering, so
    beam search and assisted decoding are not available.
    """

    is_compileable = False
    is_croppable = False

    def __init__(self, model: LanguageModel, batch_size: int, max_len: int):
        self.state = model.new_cache(batch_size, max_len)

    @property
    def seen(self) -> int:
        return self.state.seen

    @property
    def max_len(self) -> int:
        return self.state.max_len

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.state.seen


class RatForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = RatConfig
    base_model_prefix = "model"
    # The logits use model.embed.weight itself. lm_head shows that same matrix to transformers (for
    # get_output_embeddings and resize_token_embeddings), and this mapping keeps the two tied.
    _tied_weights_keys = {"lm_head.weight": "model.embed.weight"}
    _no_split_modules = ["Block"]
    _is_stateful = True  # the recurrent state cannot be rewound: no assisted or contrastive decoding
    cache_slack = 256  # tokens a new generation cache holds beyond the prompt before it must grow

    def __init__(self, config: RatConfig):
        super().__init__(config)
        self.model = LanguageModel(config.to_ratlm())
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False, device="meta")
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """`LanguageModel.init_weights`, module by module, leaving loaded tensors alone: Linear and
        Embedding N(0, init_std), norm weights 1, and each mixer's own gate-bias init (not zeros)."""
        if isinstance(module, (nn.Linear, nn.Embedding)):
            initialization.normal_(module.weight, mean=0.0, std=self.config.init_std)
        elif isinstance(module, RMSNorm):
            initialization.ones_(module.weight)
        elif isinstance(module, (RAT, RNN)) and not getattr(module.gate_bias, "_is_hf_initialized", False):
            module.init_gate_bias()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # prepare_inputs_for_generation makes a RatCache instead

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed = value
        self.model.config.vocab_size = value.num_embeddings  # the model checks token ids against it

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        cache: RatCache | None = None,
        labels: Tensor | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """Logits for input_ids [B, T]; with a cache they continue the tokens it has seen. `labels` are
        the inputs themselves (shifted here), -100 where ignored. Padding is not supported."""
        cache = kwargs.pop("past_key_values", None) if cache is None else cache
        if kwargs.get("inputs_embeds") is not None:
            raise ValueError("RatForCausalLM takes input_ids, not inputs_embeds")
        _require_unpadded(attention_mask)
        logits = self.model(input_ids, cache=None if cache is None else cache.state)
        loss = None
        if labels is not None:
            labels = labels[:, 1:].to(logits.device)
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{_CACHE: cache})

    def prepare_inputs_for_generation(
        self, input_ids: Tensor, cache: RatCache | None = None, attention_mask: Tensor | None = None, **kwargs
    ) -> dict:
        """The tokens the cache has not seen yet, and the cache (a new one on the first step)."""
        cache = kwargs.pop("past_key_values", None) if cache is None else cache
        _require_unpadded(attention_mask)
        B, T = input_ids.shape
        if cache is None or cache.max_len < T:
            # A new cache replays the whole sequence; doubling the room keeps the replays rare.
            cache = RatCache(self.model, B, T + max(T, self.cache_slack))
        return {"input_ids": input_ids[:, cache.seen :], _CACHE: cache}

    def save_pretrained(self, save_directory, **kwargs) -> None:
        """transformers' save_pretrained in ratlm's format (tensor names of `LanguageModel`, ratlm's
        config.json), so `ratlm.from_pretrained` reads the directory too."""
        state = kwargs.pop("state_dict", None) or self.state_dict()
        state = {k.removeprefix("model."): v for k, v in state.items() if k != "lm_head.weight"}
        super().save_pretrained(save_directory, state_dict=state, **kwargs)


def _require_unpadded(attention_mask: Tensor | None) -> None:
    if attention_mask is not None and not bool(attention_mask.all()):
        raise ValueError(
            "RatForCausalLM has no attention mask, so padded batches would be wrong: give prompts of one "
            "length, or use ratlm's own generate function, which takes prompts of any lengths"
        )


# Whichever of ratlm and transformers is imported first, loading these classes makes them known.
register_auto_classes()
