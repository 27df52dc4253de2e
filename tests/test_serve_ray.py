"""The Ray Serve deployment (fastdiff.serving.ray) on a local Ray instance on loopback: two replicas, one batcher
each, the same HTTP schema as ``fastdiff serve``; answers equal sampling alone. Skipped where ray is absent."""

import asyncio
import socket

import pytest
import torch

ray = pytest.importorskip("ray")
pytest.importorskip("ray.serve")
httpx = pytest.importorskip("httpx")

import fastdiff as fd  # noqa: E402

pytestmark = pytest.mark.slow


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_replicas_answer_like_sampling_alone():
    from ray import serve

    from fastdiff.serving.http import gmm_spec
    from fastdiff.serving.ray import build_app, deployment

    with pytest.raises(ValueError, match="unknown arguments"):
        build_app({"model": "gmm", "nonsense": 1})
    port = free_port()
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False,
             configure_logging=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        app = deployment("gmm", num_replicas=2, max_batch=8, cpu_threads=1, ray_actor_options={"num_cpus": 0.5})
        serve.run(app, name="fastdiff", route_prefix="/")

        async def ask():
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=120) as client:
                good = await asyncio.gather(*[client.post("/sample", json={"seed": s, "steps": 4}) for s in range(8)])
                bad = await client.post("/sample", content=b'{"guidance": NaN}')
                ready = await client.get("/readyz")
                return good, bad, ready

        good, bad, ready = asyncio.run(ask())
    finally:
        serve.shutdown()
        ray.shutdown()
    assert [r.status_code for r in good] == [200] * 8
    assert bad.status_code == 422 and bad.json()["detail"][0]["field"] == "guidance"
    assert ready.status_code == 200
    spec = gmm_spec()
    plan = fd.plan("dpmpp_2m", spec.schedule, 4, prediction=spec.prediction)
    for s in (0, 7):
        want = fd.sample(spec.model, plan, shape=(1,) + spec.shape, seeds=[s])[0]
        torch.testing.assert_close(torch.tensor(good[s].json()["sample"]), want, rtol=1e-6, atol=1e-6)
