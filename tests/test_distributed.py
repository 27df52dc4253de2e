"""fastdiff.distributed.sample under torchrun (2 CPU processes, gloo, loopback): equals one process."""

import os
import subprocess
import sys

import pytest
import torch

import fastdiff as fd
from fastdiff.models import GaussianMixture

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.mark.parametrize("init", ["script", "auto"])
def test_two_processes_equal_one(tmp_path, init):
    out = tmp_path / "x.pt"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    # --standalone: a local rendezvous on a free loopback port
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(HERE, "dist_worker.py"), str(out), init]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    got = torch.load(out)
    sch = fd.schedules.EDM()
    mix = GaussianMixture([-1.0, 2.0], [0.3, 0.5])

    def model(x, t, shift):
        return mix.model(sch, "epsilon")(x, t) + 0.01 * shift[:, None]

    want = fd.sample(model, fd.plan("euler_ancestral", sch, 6), shape=(5, 7), seeds=[11, 22, 33, 44, 55],
                     cond={"shift": torch.arange(5.0)}, backend="torch")
    assert torch.equal(got, want)


def test_needs_a_process_group(monkeypatch):
    from fastdiff import distributed

    for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(ValueError, match="torchrun"):
        distributed.sample(lambda x, t: x, fd.plan("euler", fd.schedules.EDM(), 2), [1], (3,))
