"""transformers integration (`pip install 'ratlm[hf]'`): `RatConfig`, `RatForCausalLM`, `RatCache`.

    from transformers import AutoModelForCausalLM
    import ratlm
    model = AutoModelForCausalLM.from_pretrained("runs/rat-small")     # any ratlm model directory

Importing ratlm never imports transformers (it takes seconds). Instead `ratlm/__init__.py` calls
`register_when_transformers_imported()`, which registers the classes with AutoConfig and
AutoModelForCausalLM right after transformers itself is imported, or at once if it already is.
Registering imports transformers' model classes, so a program that imports ratlm and then
transformers pays for those even if it never loads a model. The classes live in
`ratlm.hf.modeling` and are loaded on first access from here.
"""

from __future__ import annotations

import importlib.abc
import sys
import warnings

__all__ = ["RatCache", "RatConfig", "RatForCausalLM", "register_auto_classes"]

_EXPORTS = {"RatCache", "RatConfig", "RatForCausalLM"}


def __getattr__(name: str):
    if name in _EXPORTS:
        try:
            from . import modeling
        except ModuleNotFoundError as e:
            if e.name != "transformers":
                raise
            raise ImportError(f"ratlm.hf.{name} needs transformers: pip install 'ratlm[hf]'") from e
        return getattr(modeling, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def register_auto_classes() -> None:
    """Let AutoConfig and AutoModelForCausalLM load directories whose config.json names model_type ratlm."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from .modeling import RatConfig, RatForCausalLM

    AutoConfig.register(RatConfig.model_type, RatConfig, exist_ok=True)
    AutoModelForCausalLM.register(RatConfig, RatForCausalLM, exist_ok=True)


def _register_quietly() -> None:
    modeling = sys.modules.get(f"{__name__}.modeling")
    if modeling is not None and not hasattr(modeling, "RatForCausalLM"):
        return  # transformers is imported by ratlm.hf.modeling itself, which registers once it is done
    # A transformers version these classes do not fit must not break `import transformers` elsewhere.
    try:
        register_auto_classes()
    except Exception as e:
        warnings.warn(f"ratlm: could not register with transformers' Auto classes: {e}", stacklevel=2)


class _AfterTransformersImport(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """An import hook: lets the real loader execute `transformers`, then registers ratlm, then leaves.

    It stays in place until transformers is executed: a mere `importlib.util.find_spec("transformers")`
    (an availability check, as lm-eval makes) finds the spec through it without importing anything.
    """

    def find_spec(self, fullname, path, target=None):
        if fullname != "transformers":
            return None
        for finder in sys.meta_path:  # the finder that would have found it without this hook
            find = getattr(finder, "find_spec", None)
            spec = None if finder is self or find is None else find(fullname, path, target)
            if spec is not None:
                break
        if spec is None or spec.loader is None:
            return spec
        self._loader, spec.loader = spec.loader, self
        return spec

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        module.__spec__.loader = module.__loader__ = self._loader  # transformers sees its own loader
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        self._loader.exec_module(module)
        _register_quietly()


def register_when_transformers_imported() -> None:
    """Register the Auto classes now if transformers is imported, else right after it is."""
    if "transformers" in sys.modules:
        _register_quietly()
    elif not any(isinstance(f, _AfterTransformersImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterTransformersImport())
