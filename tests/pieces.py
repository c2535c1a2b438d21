"""How the cache tests cut a sequence into the pieces fed one call at a time."""

import torch


def piece_sizes(T: int, how: str, longest: int = 5) -> list[int]:
    """ "whole": one piece; "tokens": one token per piece; "random": random pieces of 1..longest tokens."""
    if how == "whole":
        return [T]
    if how == "tokens":
        return [1] * T
    sizes, left = [], T
    while left:
        sizes.append(min(left, int(torch.randint(1, longest + 1, ()))))
        left -= sizes[-1]
    return sizes
