"""Without CUDA the benchmark's Triton kernels run in Triton's CPU interpreter (read at kernel import)."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
