"""Test-wide settings.

`make test` runs two xdist workers on a 2-core machine; two OpenMP threads per
worker oversubscribe the cores and make small matmuls 10-50x slower, so every
worker uses one torch thread.
"""
import torch

torch.set_num_threads(1)
