"""The example HTTP service, driven on loopback with a bounded number of concurrent requests."""

import json
import os
import sys
import threading
import urllib.request

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))


def test_http_service_serves_concurrent_requests():
    from serve_http import make_server

    import fastdiff as fd
    from fastdiff.models import digits

    server, batcher = make_server(port=0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}/sample"
    answers = {}

    def ask(seed):
        body = json.dumps({"label": seed % 10, "seed": seed, "steps": 6}).encode()
        with urllib.request.urlopen(urllib.request.Request(url, data=body), timeout=60) as r:
            answers[seed] = json.loads(r.read())

    try:
        threads = [threading.Thread(target=ask, args=(s,)) for s in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        bad = urllib.request.Request(url, data=json.dumps({"label": 42}).encode())
        try:
            urllib.request.urlopen(bad, timeout=30)
            raise AssertionError("a bad label must be rejected")
        except urllib.error.HTTPError as e:
            assert e.code == 400 and "label" in json.loads(e.read())["error"]
    finally:
        server.shutdown()
        batcher.close()
    assert sorted(answers) == list(range(6))
    plan = fd.plan("dpmpp_2m", digits.schedule(), 6, prediction=digits.PREDICTION)
    want = fd.sample(digits.pretrained_unet(), plan, shape=(1, 1, 8, 8), seeds=[3], guidance_scale=2.0,
                     cond={"label": torch.tensor([3])}, uncond={"label": torch.tensor([10])})
    torch.testing.assert_close(torch.tensor(answers[3]["image"]), want[0, 0], rtol=1e-4, atol=1e-4)
