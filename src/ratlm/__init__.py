"""ratlm: RAT language models (chunked recurrence + attention, arXiv 2507.04416) and their baselines."""

from .cache import ModelCache
from .config import PRESETS, ModelConfig, preset
from .generation import generate
from .hf import register_when_transformers_imported as _register_hf
from .model import LanguageModel

__version__ = "0.1.0"

# transformers' AutoConfig / AutoModelForCausalLM learn the ratlm classes once transformers is imported
# (or now, if it is); ratlm never imports transformers itself. See ratlm/hf/__init__.py.
_register_hf()

__all__ = ["LanguageModel", "ModelCache", "ModelConfig", "PRESETS", "preset", "from_pretrained", "generate"]


def from_pretrained(directory, device=None, dtype=None) -> LanguageModel:
    """Load a model saved by `save_pretrained` or written by `ratlm convert-official`."""
    from .checkpoint import from_pretrained as _load

    return _load(directory, device=device, dtype=dtype)
