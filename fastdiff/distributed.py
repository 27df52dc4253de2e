"""Multi-process sampling on torch.distributed: shard the seeds over ranks, sample, gather on rank 0.

Because a seed's sample does not depend on the batch it is drawn in (Philox keyed by the sample's seed), the
gathered batch equals one process sampling all seeds on the same backend, bit for bit.
"""

from __future__ import annotations

import torch

from .sampler import sample as _sample


def _shard(n: int, rank: int, world: int) -> tuple[int, int]:
    """Contiguous, balanced shard [lo, hi) of n items for a rank."""
    return rank * n // world, (rank + 1) * n // world


def _ensure_process_group(device=None):
    """Initialise the default process group from torchrun's environment when nobody did yet: NCCL for CUDA
    devices, gloo otherwise. It stays initialised for later calls (``destroy_process_group`` is the caller's)."""
    import os

    import torch.distributed as dist

    if not dist.is_available():
        raise ValueError("fastdiff.distributed.sample needs torch.distributed, which this torch build lacks")
    if dist.is_initialized():
        return
    if not all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")):
        raise ValueError("fastdiff.distributed.sample needs a process group: start the script with torchrun (it "
                         "then initialises one itself) or call torch.distributed.init_process_group first")
    cuda = torch.device(device).type == "cuda" if device is not None else torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo")


def sample(model, plan, seeds, sample_shape, **sample_kwargs):
    """Sample ``len(seeds)`` images split over the ranks of the default process group.

    Parameters
    ----------
    model, plan
        As for ``fastdiff.sample``.
    seeds : sequence of int
        One seed per sample of the whole batch (the same list on every rank).
    sample_shape : tuple
        Shape of one sample, without the batch dimension.
    **sample_kwargs
        Passed to ``fastdiff.sample`` (``device``, ``backend``, ``guidance_scale``, ...). Tensors in ``cond`` /
        ``uncond`` and an ``x_T`` with one row per seed are sharded along dim 0 like the seeds.

    Returns
    -------
    Tensor [len(seeds), *sample_shape] on rank 0, None on the other ranks.

    Under torchrun the default process group is initialised here when it is not yet (NCCL for a CUDA device, gloo
    otherwise).
    """
    import torch.distributed as dist

    _ensure_process_group(sample_kwargs.get("device"))
    rank, world = dist.get_rank(), dist.get_world_size()
    seeds = list(seeds)
    n = len(seeds)
    if n == 0:
        raise ValueError("seeds is empty: give one seed per sample")
    lo, hi = _shard(n, rank, world)
    kwargs = dict(sample_kwargs)
    for key in ("cond", "uncond"):
        if kwargs.get(key):
            kwargs[key] = {k: (v[lo:hi] if isinstance(v, torch.Tensor) and v.shape[0] == n else v)
                           for k, v in kwargs[key].items()}
    if isinstance(kwargs.get("x_T"), torch.Tensor):
        kwargs["x_T"] = kwargs["x_T"][lo:hi]
    device = torch.device(kwargs.get("device") or ("cuda" if dist.get_backend() == "nccl" else "cpu"))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    kwargs.setdefault("device", device)
    dtype = kwargs.get("dtype") or (kwargs["x_T"].dtype if isinstance(kwargs.get("x_T"), torch.Tensor)
                                    else torch.float32)
    width = (n + world - 1) // world  # every rank sends a padded block of the largest shard size
    block = torch.zeros((width,) + tuple(sample_shape), dtype=dtype, device=device)
    if hi > lo:
        if "x_T" in kwargs:
            local = _sample(model, plan, seeds=seeds[lo:hi], **kwargs)
        else:
            local = _sample(model, plan, shape=(hi - lo,) + tuple(sample_shape), seeds=seeds[lo:hi], **kwargs)
        block[: hi - lo] = local
    parts = [torch.empty_like(block) for _ in range(world)]
    dist.all_gather(parts, block)
    if rank != 0:
        return None
    return torch.cat([parts[r][: _shard(n, r, world)[1] - _shard(n, r, world)[0]] for r in range(world)])
