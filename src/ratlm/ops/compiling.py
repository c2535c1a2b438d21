"""torch.compile'd callables that keep compiling: room for more compiled entries than dynamo's default.

Dynamo keeps 8 compiled entries per function (code object) and then runs the function eagerly, with one
warning; a second limit (accumulated_recompile_limit, 256) bounds the entries it keeps in all. Every new
input shape of a `dynamic=False` compile is one more entry: a sweep over sequence lengths (`ratlm eval
length`, the benchmarks) or a process that decodes with several caches gets there. For FlexAttention eager
means materialising every score (O(T^2) memory); for the compiled decode step it means losing the fusion.
"""

from __future__ import annotations

RECOMPILE_LIMIT = 1024


def _limit_names(dynamo_config) -> list[str]:
    # torch >= 2.7: recompile_limit and accumulated_recompile_limit; 2.5 and 2.6: *cache_size_limit
    return [
        name if hasattr(dynamo_config, name) else old
        for name, old in (
            ("recompile_limit", "cache_size_limit"),
            ("accumulated_recompile_limit", "accumulated_cache_size_limit"),
        )
    ]


def with_recompile_room(fn, limit: int = RECOMPILE_LIMIT):
    """fn (a torch.compile'd callable), run with room for `limit` compiled entries (dynamo: 8).

    Raises both of dynamo's limits to at least `limit` for the process (and thread) when called: a higher
    limit only means compiling a new shape instead of running it eagerly. A call that finds them lower
    again (lowered since, or another thread) runs under a scoped `config.patch`, which costs some 45 us.
    """
    import torch._dynamo.config as dynamo_config

    names = _limit_names(dynamo_config)
    for name in names:
        setattr(dynamo_config, name, max(getattr(dynamo_config, name), limit))

    def call(*args, **kwargs):
        if all(getattr(dynamo_config, name) >= limit for name in names):
            return fn(*args, **kwargs)
        with dynamo_config.patch({name: max(getattr(dynamo_config, name), limit) for name in names}):
            return fn(*args, **kwargs)

    return call
