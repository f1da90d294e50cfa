"""Test-wide settings.

`make test` runs two xdist workers on a 2-core machine; two OpenMP/BLAS threads
per worker oversubscribe the cores and make the small matmuls of these tests
10-50x slower, so every worker uses one torch thread and one BLAS thread.
``TEST_THREADS=2 make test`` runs the suite with two threads per worker instead:
the results must not depend on it (kernels sum in another order).
"""
import os

import threadpoolctl
import torch

THREADS = int(os.environ.get("TEST_THREADS", "1"))
torch.set_num_threads(THREADS)
_blas_limit = threadpoolctl.threadpool_limits(THREADS)
