"""torch.compile'd callables that keep compiling: room for more compiled entries than dynamo's default.

Dynamo keeps 8 compiled entries per function (code object) and then runs the function eagerly, with one
warning. Every new input shape of a `dynamic=False` compile is one more entry: a sweep over sequence lengths
(`ratlm eval length`, the benchmarks) or a process that decodes with several caches gets there. For
FlexAttention eager means materialising every score (O(T^2) memory); for the compiled decode step it means
losing the fusion. The callables below run with room for RECOMPILE_LIMIT entries instead.
"""

from __future__ import annotations

RECOMPILE_LIMIT = 256


def with_recompile_room(fn, limit: int = RECOMPILE_LIMIT):
    """fn (a torch.compile'd callable), run with room for `limit` compiled entries (dynamo: 8)."""
    import torch._dynamo.config as dynamo_config

    # torch >= 2.7 calls it recompile_limit; 2.5 and 2.6 cache_size_limit
    name = "recompile_limit" if hasattr(dynamo_config, "recompile_limit") else "cache_size_limit"

    def call(*args, **kwargs):
        with dynamo_config.patch({name: max(getattr(dynamo_config, name), limit)}):
            return fn(*args, **kwargs)

    return call
