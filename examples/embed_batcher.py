"""Embedding fastdiff's ContinuousBatcher in your own web app (FastAPI here; any framework works the same way).

    python examples/embed_batcher.py
    curl -s "127.0.0.1:8000/digit/3?seed=7"

For a ready service (validation, limits, timeouts, metrics, PNG / raw responses) run ``fastdiff serve`` instead;
this file shows the few lines the batcher needs: start it with the app, submit from handlers, await the future,
map its errors to HTTP answers, close it with the app.  When a handler is cancelled (its client left), the
awaited future is cancelled with it and the batcher frees the request's rows.
"""

from __future__ import annotations

import asyncio
import contextlib

import torch
from fastapi import FastAPI, HTTPException

import fastdiff as fd
from fastdiff.models import digits
from fastdiff.serving import ContinuousBatcher, QueueFull

SCHEDULE = digits.schedule()
PLAN = fd.plan("dpmpp_2m", SCHEDULE, 10, prediction=digits.PREDICTION)


@contextlib.asynccontextmanager
async def lifespan(app):
    # one batcher per process; cpu_threads=1 keeps torch's OpenMP regions fast on the batcher's own thread
    app.state.batcher = ContinuousBatcher(digits.pretrained_unet(), max_batch=16, max_queue=64, cpu_threads=1,
                                          request_timeout=30.0).start()
    yield
    await asyncio.to_thread(app.state.batcher.close)


app = FastAPI(lifespan=lifespan)


@app.get("/digit/{label}")
async def digit(label: int, seed: int = 0, guidance: float = 2.0):
    if not 0 <= label <= 9:
        raise HTTPException(422, "label must be 0..9")
    try:
        fut = app.state.batcher.submit(PLAN, seed, (1, 8, 8), cond={"label": torch.tensor(label)},
                                       uncond={"label": torch.tensor(10)}, guidance_scale=guidance)
    except QueueFull as e:
        raise HTTPException(503, str(e), headers={"Retry-After": "1"}) from None
    except ValueError as e:  # a bad seed or guidance: the batcher validates at submit
        raise HTTPException(422, str(e)) from None
    try:
        x = await asyncio.wrap_future(fut)
    except TimeoutError as e:
        raise HTTPException(504, str(e)) from None
    return {"label": label, "seed": seed, "image": x[0].tolist()}


if __name__ == "__main__":
    import uvicorn

    uvicorn.run(app, host="127.0.0.1", port=8000)
