"""A minimal HTTP sampling service on fastdiff's ContinuousBatcher (standard library only).

    python examples/serve_http.py --port 8000
    curl -s localhost:8000/sample -d '{"label": 3, "seed": 7, "solver": "dpmpp_2m", "steps": 10}'

Concurrent requests share model calls; each response is what sampling that request alone would give.
Response: {"seed": ..., "image": [[...8 rows of 8 floats in [-1, 1]...]]}.
"""

from __future__ import annotations

import argparse
import json
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch

import fastdiff as fd
from fastdiff.models import digits
from fastdiff.serving import ContinuousBatcher, QueueFullError


def make_server(port: int = 0, host: str = "127.0.0.1", max_batch: int = 16):
    """A ThreadingHTTPServer bound to host:port (0 = any free port) and its batcher (already started)."""
    unet, sch = digits.pretrained_unet(), digits.schedule()
    batcher = ContinuousBatcher(unet, max_batch=max_batch).__enter__()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            if self.path != "/sample":
                return self._reply(404, {"error": "POST /sample"})
            try:
                req = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                label = int(req.get("label", 0))
                if not 0 <= label <= 9:
                    raise ValueError("label must be 0..9")
                plan = fd.plan(req.get("solver", "dpmpp_2m"), sch, int(req.get("steps", 10)),
                               prediction=digits.PREDICTION)
                fut = batcher.submit(plan, int(req.get("seed", 0)), (1, 8, 8), cond={"label": torch.tensor(label)},
                                     uncond={"label": torch.tensor(10)},
                                     guidance_scale=float(req.get("guidance", 2.0)))
                x = fut.result(timeout=120)
            except QueueFullError as e:
                return self._reply(503, {"error": str(e)})
            except (ValueError, KeyError, json.JSONDecodeError) as e:
                return self._reply(400, {"error": str(e)})
            self._reply(200, {"seed": int(req.get("seed", 0)), "image": x[0].tolist()})

        def _reply(self, code, body):
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):  # quiet
            pass

    return ThreadingHTTPServer((host, port), Handler), batcher


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, default=8000)
    args = ap.parse_args()
    server, batcher = make_server(args.port)
    print(f"serving on http://127.0.0.1:{server.server_address[1]}/sample")
    try:
        server.serve_forever()
    finally:
        batcher.close()


if __name__ == "__main__":
    main()
