"""The embedding example (examples/embed_batcher.py), driven in process through httpx's ASGI transport."""

import asyncio
import importlib.util
import os

import pytest
import torch

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

HERE = os.path.dirname(os.path.abspath(__file__))


def load_example():
    spec = importlib.util.spec_from_file_location("embed_batcher", os.path.join(HERE, "..", "examples",
                                                                                  "embed_batcher.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_embedded_batcher_serves_concurrent_requests():
    import fastdiff as fd
    from fastdiff.models import digits

    ex = load_example()

    async def run():
        async with ex.lifespan(ex.app):
            transport = httpx.ASGITransport(app=ex.app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as client:
                answers = await asyncio.gather(*[client.get(f"/digit/{s % 10}", params={"seed": s}) for s in range(4)])
                bad = await client.get("/digit/42")
                bad_seed = await client.get("/digit/3", params={"seed": -1})
        return answers, bad, bad_seed

    answers, bad, bad_seed = asyncio.run(run())
    assert [r.status_code for r in answers] == [200] * 4
    assert bad.status_code == 422 and "label" in bad.json()["detail"]
    assert bad_seed.status_code == 422 and "seed" in bad_seed.json()["detail"]
    want = fd.sample(digits.pretrained_unet(), ex.PLAN, shape=(1, 1, 8, 8), seeds=[3], guidance_scale=2.0,
                     cond={"label": torch.tensor([3])}, uncond={"label": torch.tensor([10])})
    torch.testing.assert_close(torch.tensor(answers[3].json()["image"]), want[0, 0], rtol=1e-4, atol=1e-4)
