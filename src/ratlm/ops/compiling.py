"""torch.compile'd callables that keep compiling: room for more compiled entries than dynamo's default.

Dynamo keeps 8 compiled entries per function (code object) and then runs the function eagerly, with one
warning. Every new input shape of a `dynamic=False` compile is one more entry: a sweep over sequence lengths
(`ratlm eval length`, the benchmarks) or a process that decodes with several caches gets there. For
FlexAttention eager means materialising every score (O(T^2) memory); for the compiled decode step it means
losing the fusion. The callables below run with room for RECOMPILE_LIMIT entries instead (per function and in
all: dynamo also stops at 256 entries across every function).
"""

from __future__ import annotations

RECOMPILE_LIMIT = 1024


def with_recompile_room(fn, limit: int = RECOMPILE_LIMIT):
    """fn (a torch.compile'd callable), run with room for `limit` compiled entries (dynamo: 8)."""
    import torch._dynamo.config as dynamo_config

    # torch >= 2.7 calls them recompile_limit and accumulated_recompile_limit; 2.5 and 2.6 *_cache_size_limit
    names = [
        name if hasattr(dynamo_config, name) else old
        for name, old in (
            ("recompile_limit", "cache_size_limit"),  # entries per function
            ("accumulated_recompile_limit", "accumulated_cache_size_limit"),  # entries in all, default 256
        )
    ]

    def call(*args, **kwargs):
        with dynamo_config.patch({name: max(getattr(dynamo_config, name), limit) for name in names}):
            return fn(*args, **kwargs)

    return call
