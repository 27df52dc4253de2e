"""Run by tests/test_distributed.py under torchrun: sample with fastdiff.distributed and save rank 0's result.

argv: output path, then "script" (this script initialises the process group) or "auto" (fastdiff does)."""

import sys

import torch
import torch.distributed as dist

import fastdiff as fd
from fastdiff import distributed
from fastdiff.models import GaussianMixture


def main(out_path, init):
    if init == "script":
        dist.init_process_group("gloo")
    else:  # fastdiff.distributed.sample initialises the group from torchrun's environment
        assert not dist.is_initialized()
    sch = fd.schedules.EDM()
    mix = GaussianMixture([-1.0, 2.0], [0.3, 0.5])
    plan = fd.plan("euler_ancestral", sch, 6)
    seeds = [11, 22, 33, 44, 55]  # 5 over 2 ranks: uneven shards
    labels = torch.arange(5.0)

    def model(x, t, shift):
        return mix.model(sch, "epsilon")(x, t) + 0.01 * shift[:, None]

    x = distributed.sample(model, plan, seeds, (7,), cond={"shift": labels}, backend="torch")
    if dist.get_rank() == 0:
        torch.save(x, out_path)
    else:
        assert x is None
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
