"""Scale-out on Ray Serve: the ``fastdiff serve`` app (same HTTP schema and endpoints) as a Ray Serve deployment,
one ContinuousBatcher per replica (optional extra ``fastdiff[ray]``).

One machine::

    python -m fastdiff.serving.ray --model digits --num-replicas 2 --port 8000

A Ray cluster (``ray start --head`` on one node, ``ray start --address=HEAD:6379`` on the others), from any node::

    serve run fastdiff.serving.ray:build_app model=digits num_replicas=4 cpu_threads=1

Ray's proxy spreads requests over the replicas; each replica batches what it receives.  Replicas are independent
processes (a model copy and a batcher each), so their number, or ``autoscaling_config``, is the scale knob;
``max_ongoing_requests`` per replica is set to its ``max_queue`` so the batcher, not Ray, decides when it is full.
"""

import argparse

DEFAULT_NAME = "fastdiff"


def _app_builder(model, app_options):
    """A function Ray calls on each replica to build that replica's ASGI app (and so its own batcher)."""

    def build():
        from .http import create_app

        return create_app(model, **app_options)

    return build


def deployment(model="digits", *, num_replicas: int | None = 1, autoscaling_config: dict | None = None,
               ray_actor_options: dict | None = None, max_ongoing_requests: int | None = None,
               name: str = DEFAULT_NAME, **app_options):
    """A bound Ray Serve application serving ``fastdiff serve``'s app, one batcher per replica.

    Parameters
    ----------
    model : str or ModelSpec
        As ``fastdiff serve --model``: "digits", "gmm" or "module:callable" (importable on every node).
    num_replicas : int
        Fixed number of replicas (ignored when ``autoscaling_config`` is given).
    autoscaling_config : dict, optional
        Ray Serve autoscaling, e.g. ``{"min_replicas": 1, "max_replicas": 8, "target_ongoing_requests": 32}``.
    ray_actor_options : dict, optional
        Resources per replica, e.g. ``{"num_cpus": 2}`` or ``{"num_gpus": 1}``.
    max_ongoing_requests : int, optional
        Requests Ray lets into one replica at once (default: the batcher's ``max_queue``).
    **app_options
        ``create_app`` options: max_batch, max_queue, cpu_threads, request_timeout, max_body_bytes, backend.

    Returns the application for ``serve.run(app, route_prefix="/")``.
    """
    from ray import serve

    options = dict(name=name, max_ongoing_requests=max_ongoing_requests or app_options.get("max_queue", 256))
    if autoscaling_config is not None:
        options["autoscaling_config"] = dict(autoscaling_config)
    else:
        if not isinstance(num_replicas, int) or num_replicas < 1:
            raise ValueError(f"num_replicas must be an integer >= 1, got {num_replicas!r}")
        options["num_replicas"] = num_replicas
    if ray_actor_options is not None:
        options["ray_actor_options"] = dict(ray_actor_options)
    ingress = serve.ingress(_app_builder(model, app_options))()
    return serve.deployment(**options)(ingress).bind()


_INT_ARGS = ("num_replicas", "max_batch", "max_queue", "cpu_threads", "max_body_bytes", "max_ongoing_requests")


def build_app(args: dict):
    """Ray Serve application builder for ``serve run fastdiff.serving.ray:build_app key=value ...`` (keys: model,
    num_replicas, max_batch, max_queue, cpu_threads, request_timeout, max_body_bytes, backend, num_cpus,
    max_ongoing_requests)."""
    args = dict(args)
    kwargs = {k: int(args.pop(k)) for k in _INT_ARGS if k in args}
    if "request_timeout" in args:
        kwargs["request_timeout"] = float(args.pop("request_timeout"))
    if "num_cpus" in args:
        kwargs["ray_actor_options"] = {"num_cpus": float(args.pop("num_cpus"))}
    model = args.pop("model", "digits")
    if "backend" in args:
        kwargs["backend"] = args.pop("backend")
    if args:
        raise ValueError(f"unknown arguments {sorted(args)} for fastdiff.serving.ray:build_app")
    return deployment(model, **kwargs)


def main(argv=None) -> int:
    """Start a local Ray instance (or join ``--address``) and serve until interrupted."""
    import time

    import ray
    from ray import serve

    ap = argparse.ArgumentParser(prog="python -m fastdiff.serving.ray",
                                 description="fastdiff serve's HTTP app on Ray Serve, one batcher per replica")
    ap.add_argument("--model", default="digits")
    ap.add_argument("--num-replicas", type=int, default=1)
    ap.add_argument("--address", default=None, help="an existing Ray cluster (default: start a local one)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--max-queue", type=int, default=256)
    ap.add_argument("--cpu-threads", type=int, default=None)
    ap.add_argument("--num-cpus", type=float, default=1.0, help="CPUs Ray reserves per replica")
    args = ap.parse_args(argv)
    ray.init(address=args.address, include_dashboard=False)
    serve.start(http_options={"host": args.host, "port": args.port})
    app = deployment(args.model, num_replicas=args.num_replicas, max_batch=args.max_batch, max_queue=args.max_queue,
                     cpu_threads=args.cpu_threads, ray_actor_options={"num_cpus": args.num_cpus})
    serve.run(app, name=DEFAULT_NAME, route_prefix="/")
    print(f"fastdiff on Ray Serve: {args.num_replicas} replicas on http://{args.host}:{args.port}/sample", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()
    return 0


if __name__ == "__main__":
    from fastdiff.serving.ray import main as _main

    raise SystemExit(_main())
