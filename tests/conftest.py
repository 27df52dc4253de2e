"""Session-wide test setup.

Without CUDA, fastdiff's Triton kernels are tested through Triton's interpreter, which must be switched on before
the first ``import triton`` anywhere in the process: Triton decides at import time whether its own ``@triton.jit``
library functions (``tl.philox``, ...) are interpretable.  Other test files import libraries that import triton
(diffusers through torch._inductor), so the switch is made here, before any test module is collected.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
