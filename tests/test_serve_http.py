"""``fastdiff serve`` (fastdiff.serving.http): answers equal sampling alone, every malformed request gets a JSON 4xx
naming the reason, limits / timeouts / disconnects / a full queue / a failing model are answered and the service
keeps serving. Most tests drive the app in process (httpx's ASGI transport); the last ones run real uvicorn on
127.0.0.1 with an ephemeral port and raw sockets. Every wait is bounded."""

import asyncio
import contextlib
import json
import socket
import threading
import time
import zlib

import numpy as np
import pytest
import torch

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")

import fastdiff as fd  # noqa: E402
from fastdiff.serving.http import ModelSpec, create_app, gmm_spec  # noqa: E402

WAIT = 60


def gmm_alone(solver, steps, seed):
    spec = gmm_spec()
    plan = fd.plan(solver, spec.schedule, steps, prediction=spec.prediction)
    return fd.sample(spec.model, plan, shape=(1,) + spec.shape, seeds=[seed])[0]


def slow_spec(delay=0.02, fail_label=None):
    """The mixture with labels 0..3 (label ignored; ``fail_label`` makes the model raise), a sleep per call."""
    base = gmm_spec()

    def model(x, t, label):
        time.sleep(delay)
        if fail_label is not None and (label == fail_label).any():
            raise RuntimeError("injected model failure")
        return base.model(x, t)

    return ModelSpec(model, base.schedule, base.prediction, base.shape, num_labels=4, null_label=3, default_label=0,
                     name="slow")


def call(app, requests):
    """Send [(method, path, kwargs)] concurrently to the app in process; returns the responses."""

    async def run():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=WAIT) as client:
            return await asyncio.gather(*[client.request(m, p, **kw) for m, p, kw in requests])

    try:
        return asyncio.run(run())
    finally:
        app.state.service.close()


def test_answers_equal_sampling_alone_in_every_format():
    app = create_app("gmm", max_batch=4)
    reqs = [("POST", "/sample", dict(json={"seed": s, "solver": "dpmpp_2m", "steps": 5})) for s in range(5)]
    reqs += [("POST", "/sample", dict(json={"seed": 7, "solver": "euler_ancestral", "steps": 6, "format": f}))
             for f in ("png", "raw")]
    answers = call(app, reqs)
    assert [r.status_code for r in answers] == [200] * 7
    for s in range(5):
        got = torch.tensor(answers[s].json()["sample"])
        torch.testing.assert_close(got, gmm_alone("dpmpp_2m", 5, s), rtol=1e-6, atol=1e-6)
    want = gmm_alone("euler_ancestral", 6, 7)
    png, raw = answers[5], answers[6]
    assert png.headers["content-type"] == "image/png" and png.content[:8] == b"\x89PNG\r\n\x1a\n"
    # PNG: IHDR says 8x8 grayscale; the pixels are the sample mapped from [-1, 1] to 0..255
    assert int.from_bytes(png.content[16:20], "big") == 8 and int.from_bytes(png.content[20:24], "big") == 8
    idat = png.content.index(b"IDAT")
    n = int.from_bytes(png.content[idat - 4: idat], "big")
    rows = np.frombuffer(zlib.decompress(png.content[idat + 4: idat + 4 + n]), np.uint8).reshape(8, 9)
    assert (rows[:, 0] == 0).all()
    expect = np.round((np.clip(want[0].numpy(), -1, 1) + 1) * 127.5)
    assert np.abs(rows[:, 1:].astype(float) - expect).max() <= 1
    assert raw.headers["x-fastdiff-shape"] == "1,8,8" and raw.headers["x-fastdiff-dtype"] == "float32"
    got = torch.from_numpy(np.frombuffer(raw.content, "<f4").reshape(1, 8, 8).copy())
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


BAD_BODIES = [
    (b"[1]", "body"), (b"null", "body"), (b'"text"', "body"), (b"{", "body"), (b"\xff\xfe", "body"),
    (b'{"guidance": NaN}', "guidance"), (b'{"guidance": Infinity}', "guidance"), (b'{"seed": -1}', "seed"),
    (b'{"seed": 18446744073709551616}', "seed"), (b'{"seed": 1.5}', "seed"), (b'{"seed": "7"}', "seed"),
    (b'{"seed": true}', "seed"), (b'{"steps": 0}', "steps"), (b'{"steps": 100000}', "steps"),
    (b'{"solver": "dpmpp2m"}', "solver"), (b'{"solver": ""}', "solver"), (b'{"format": "gif"}', "format"),
    (b'{"timeout": -1}', "timeout"), (b'{"label": 3}', "label"), (b'{"guidance": 2.0}', "guidance"),
    (b'{"nonsense": 1}', "nonsense"), (b'{"seed": [1]}', "seed"),
]


def test_every_malformed_body_gets_a_json_422_naming_the_field():
    app = create_app("gmm")
    reqs = [("POST", "/sample", dict(content=body, headers={"content-type": "application/json"}))
            for body, _ in BAD_BODIES]
    reqs.append(("POST", "/sample", dict(json={"seed": 3, "steps": 4})))  # a good one among them
    answers = call(app, reqs)
    for (body, field), r in zip(BAD_BODIES, answers):
        assert r.status_code == 422, (body, r.status_code, r.text)
        err = r.json()
        assert field in err["error"] and any(field in d["field"] for d in err["detail"]), (body, err)
    assert answers[-1].status_code == 200
    torch.testing.assert_close(torch.tensor(answers[-1].json()["sample"]), gmm_alone("dpmpp_2m", 4, 3),
                               rtol=1e-6, atol=1e-6)


def test_digits_labels_and_did_you_mean():
    app = create_app("digits", max_batch=4)
    answers = call(app, [("POST", "/sample", dict(json={"label": 42})),
                         ("POST", "/sample", dict(json={"solver": "dpmpp_2n"})),
                         ("POST", "/sample", dict(json={"label": 3, "seed": 7, "steps": 6}))])
    assert answers[0].status_code == 422 and "label" in answers[0].json()["error"]
    assert answers[1].status_code == 422 and "dpmpp_2m" in answers[1].json()["error"]  # did you mean
    from fastdiff.models import digits

    plan = fd.plan("dpmpp_2m", digits.schedule(), 6, prediction=digits.PREDICTION)
    want = fd.sample(digits.pretrained_unet(), plan, shape=(1, 1, 8, 8), seeds=[7], guidance_scale=2.0,
                     cond={"label": torch.tensor([3])}, uncond={"label": torch.tensor([10])})
    torch.testing.assert_close(torch.tensor(answers[2].json()["sample"]), want[0], rtol=1e-4, atol=1e-4)


def test_limits_health_metrics_and_unknown_routes():
    app = create_app("gmm", max_body_bytes=64)
    answers = call(app, [("POST", "/sample", dict(content=b"{" + b" " * 100 + b"}")),
                         ("GET", "/healthz", {}), ("GET", "/nope", {}), ("GET", "/sample", {}),
                         ("POST", "/sample", dict(json={"seed": 1, "steps": 3}))])
    too_big, health, missing, wrong_method, ok = answers
    assert too_big.status_code == 413 and "limit" in too_big.json()["error"]
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert missing.status_code == 404 and "error" in missing.json()
    assert wrong_method.status_code == 405 and "error" in wrong_method.json()
    assert ok.status_code == 200
    text = app.state.service.metrics.render(app.state.service.batcher)
    for name in ("fastdiff_queue_depth 0", "fastdiff_batch_occupancy",
                 'fastdiff_http_errors_total{kind="body_too_large"} 1',
                 'fastdiff_request_latency_seconds_bucket{le="+Inf"} 1', "fastdiff_request_latency_seconds_count 1"):
        assert name in text, text


def test_full_queue_timeout_and_model_failure_are_answered():
    app = create_app(slow_spec(fail_label=2), max_batch=4, max_queue=2, request_timeout=30)

    async def run():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=WAIT) as client:
            long = asyncio.ensure_future(client.post("/sample", json={"seed": 1, "solver": "euler", "steps": 400,
                                                                        "timeout": 0.3}))
            failing = asyncio.ensure_future(client.post("/sample", json={"seed": 2, "label": 2, "steps": 3}))
            for _ in range(200):  # bounded: until both are accepted
                if app.state.service.batcher is not None and app.state.service.batcher.unfinished() == 2:
                    break
                await asyncio.sleep(0.01)
            full = await client.post("/sample", json={"seed": 3})
            ready = await client.get("/readyz")
            answers = [await long, await failing, full, ready]
            answers.append(await client.post("/sample", json={"seed": 4, "steps": 3}))
            answers.append(await client.get("/readyz"))
            return answers

    try:
        long, failing, full, ready, after, ready_after = asyncio.run(run())
    finally:
        app.state.service.close()
    assert full.status_code == 503 and full.headers["retry-after"] == "1" and "max_queue" in full.json()["error"]
    assert ready.status_code == 503
    assert long.status_code == 504 and "timeout" in long.json()["error"]
    assert failing.status_code == 500 and "injected model failure" in failing.json()["error"]
    assert after.status_code == 200 and ready_after.status_code == 200


@contextlib.contextmanager
def uvicorn_server(app):
    """Real uvicorn on 127.0.0.1, an ephemeral port, in a thread; yields the port."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        for _ in range(600):  # bounded wait for startup (model load, batcher start)
            if server.started:
                break
            time.sleep(0.05)
        assert server.started
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(WAIT)
        sock.close()


def raw_request(port, data: bytes, read=True, timeout=WAIT):
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        if not read:
            return None
        chunks = []
        while True:
            c = s.recv(65536)
            if not c:
                break
            chunks.append(c)
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def post(path, body: bytes, length=None, close=True):
    length = len(body) if length is None else length
    head = f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {length}\r\n"
    return (head + ("Connection: close\r\n" if close else "") + "\r\n").encode() + body


def test_real_uvicorn_bad_lengths_disconnects_and_concurrency():
    app = create_app(slow_spec(delay=0.01), max_batch=8, body_timeout=0.5)
    service = app.state.service
    with uvicorn_server(app) as port:
        # a Content-Length larger than the body: answered when the rest does not come
        status, body = raw_request(port, post("/sample", b'{"seed": 1}', length=40))
        assert status == 408 and "Content-Length" in json.loads(body)["error"]
        status, body = raw_request(port, post("/sample", b'{"seed": 1}', length="abc"))
        assert status == 400  # uvicorn refuses a non-numeric Content-Length itself
        status, body = raw_request(port, post("/sample", b"[1]"))
        assert status == 422 and json.loads(body)["detail"][0]["field"] == "body"
        # a client that disconnects: its request is cancelled and its rows freed
        with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as s:
            s.sendall(post("/sample", b'{"seed": 5, "solver": "euler", "steps": 1000}', close=False))
            for _ in range(600):  # until the batcher has it
                if service.batcher is not None and service.batcher.unfinished() == 1:
                    break
                time.sleep(0.05)
        for _ in range(600):
            if service.batcher.stats["cancelled"] == 1 and service.batcher.unfinished() == 0:
                break
            time.sleep(0.05)
        assert service.batcher.stats["cancelled"] == 1 and service.batcher.unfinished() == 0

        async def many():
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=WAIT) as client:
                return await asyncio.gather(*[client.post("/sample", json={"seed": s, "steps": 4}) for s in range(24)])

        answers = asyncio.run(many())
        assert [r.status_code for r in answers] == [200] * 24
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=WAIT) as client:
            metrics = client.get("/metrics").text
        assert 'fastdiff_http_errors_total{kind="disconnected"} 1' in metrics
        assert service.batcher.ticks < 24 * 4  # requests shared model calls
    for s in (0, 23):
        torch.testing.assert_close(torch.tensor(answers[s].json()["sample"]), gmm_alone("dpmpp_2m", 4, s),
                                   rtol=1e-6, atol=1e-6)


def test_fastdiff_serve_command_line():
    from fastdiff.serving.http import build_parser

    args = build_parser().parse_args(["--model", "gmm", "--max-queue", "8", "--cpu-threads", "1"])
    assert (args.host, args.model, args.max_queue, args.cpu_threads) == ("127.0.0.1", "gmm", 8, 1)
    from fastdiff.serving.http import load_spec

    with pytest.raises(ValueError, match="module:callable"):
        load_spec("nonsense")
    spec = load_spec("fastdiff.serving.http:gmm_spec")
    assert spec.name == "gmm"
