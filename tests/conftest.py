"""Test-wide settings.

`make test` runs two xdist workers on a 2-core machine; two OpenMP/BLAS threads
per worker oversubscribe the cores and make the small matmuls of these tests
10-50x slower, so every worker uses one torch thread and one BLAS thread.
"""
import threadpoolctl
import torch

torch.set_num_threads(1)
_blas_limit = threadpoolctl.threadpool_limits(1)
