"""Token mixers and the blocks around them."""

from .attention import Attention
from .ffn import FFN
from .norm import RMSNorm
from .rat import RAT
from .rnn import RNN

__all__ = ["RAT", "Attention", "RNN", "FFN", "RMSNorm"]
