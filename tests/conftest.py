"""Shared test setup: choose Triton's interpreter before anything can import Triton (no CUDA here)."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
