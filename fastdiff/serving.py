"""Continuous batching for serving: requests at different steps of different plans share one model call and one
step launch per tick.

Each request has its own plan, seed, conditioning and guidance weight.  Between ticks new requests join the
running batch and finished ones leave.  A tick makes ONE model call over all active requests (each at its own
model time) and ONE ``fastdiff::step`` launch with per-sample coefficient rows; plans with fewer history slots
are embedded in the largest slot layout of the tick (zero columns, identity rows for slots they do not write),
so every request computes exactly what it would compute alone.

Requests are batched together when they share the sample shape, dtype, conditioning keys and shapes, and
whether guidance is on; others wait until the running batch of another kind drains.
"""

from __future__ import annotations

import queue
import threading
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np
import torch

from . import ops, rng
from .backends import resolve
from .plan import Plan
from .sampler import _check_end



class QueueFullError(RuntimeError):
    """The batcher's bounded queue is full: retry later or raise ``max_queue``."""


@dataclass
class _Request:
    plan: Plan
    seed: int
    shape: tuple
    cond: dict
    uncond: dict
    guidance: float | None
    future: Future
    x: torch.Tensor = None
    slots: torch.Tensor = None
    stage: int = 0
    key: tuple = field(default=None)


class ContinuousBatcher:
    """A background loop that serves sampling requests with continuous batching.

    Parameters
    ----------
    model : callable
        ``model(x [B, ...], t [B], **cond) -> out``; t holds each request's own model time.
    max_batch : int
        Requests sampled together at most (with guidance the model sees 2 * max_batch rows).
    backend : str
        Step backend ("auto" picks the fused kernel for the device).
    max_queue : int
        Bound of the waiting queue; ``submit`` raises QueueFullError beyond it.
    device, dtype
        Where and in which dtype samples are computed.
    cpu_threads : int, optional
        Intra-op threads of the batcher's own thread (``torch.set_num_threads`` there; the caller's setting is
        untouched). Default: the caller's count. On some CPU builds torch's OpenMP regions are much slower on a
        thread other than the main one with more than one thread (measured 3.5x on the 2-core CI machine with the
        digits UNet); ``cpu_threads=1`` avoids that.

    Use as a context manager: ``with ContinuousBatcher(model) as b: fut = b.submit(plan, seed, shape)``.
    """

    def __init__(self, model, max_batch: int = 16, backend: str = "auto", max_queue: int = 256, device="cpu",
                 dtype=torch.float32, cpu_threads: int | None = None):
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        if cpu_threads is not None and (not isinstance(cpu_threads, int) or cpu_threads < 1):
            raise ValueError(f"cpu_threads must be an integer >= 1, got {cpu_threads!r}")
        self.cpu_threads = torch.get_num_threads() if cpu_threads is None else cpu_threads
        self.model, self.max_batch = model, int(max_batch)
        self.device, self.dtype = torch.device(device), dtype
        self.kernel = resolve(backend, self.device.type)
        self._queue: queue.Queue = queue.Queue(maxsize=max_queue)
        self._active: list[_Request] = []
        self._waiting: list[_Request] = []
        self._stop = threading.Event()
        self._thread = None
        self.ticks = 0  # model calls made (for tests and stats)

    # -- lifecycle -----------------------------------------------------------------------------------------------
    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.close()

    def start(self):
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="fastdiff-batcher", daemon=True)
            self._thread.start()

    def close(self):
        """Finish every submitted request, then stop the loop."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    # -- API -----------------------------------------------------------------------------------------------------
    def submit(self, plan: Plan, seed: int, shape, cond=None, uncond=None, guidance_scale=None) -> Future:
        """Queue one sample; returns a Future resolving to a tensor of ``shape`` (thread-safe)."""
        if not isinstance(plan, Plan):
            raise ValueError("plan must be a fastdiff Plan")
        if self._stop.is_set():
            raise RuntimeError("the batcher is closed")
        shape = tuple(int(s) for s in shape)
        cond, uncond = dict(cond or {}), dict(uncond or {})
        if guidance_scale is not None and set(cond) != set(uncond):
            raise ValueError("with guidance_scale, cond and uncond must have the same keys")
        for v in list(cond.values()) + list(uncond.values()):
            if not isinstance(v, torch.Tensor):
                raise ValueError("conditioning values must be tensors for one sample (no batch dimension)")
        fut: Future = Future()
        req = _Request(plan, int(seed), shape, cond, uncond, guidance_scale, fut)
        req.key = (shape, guidance_scale is not None, tuple(sorted((k, tuple(v.shape)) for k, v in cond.items())))
        try:
            self._queue.put_nowait(req)
        except queue.Full:
            raise QueueFullError(f"the batcher's queue is full ({self._queue.maxsize} waiting requests): retry "
                                 "later or create it with a larger max_queue") from None
        return fut

    # -- the loop ------------------------------------------------------------------------------------------------
    def _admit(self):
        while True:
            try:
                self._waiting.append(self._queue.get_nowait())
            except queue.Empty:
                break
        key = self._active[0].key if self._active else (self._waiting[0].key if self._waiting else None)
        keep = []
        for req in self._waiting:
            if len(self._active) < self.max_batch and req.key == key:
                self._start(req)
                self._active.append(req)
            else:
                keep.append(req)
        self._waiting = keep

    def _start(self, req):
        p = req.plan
        seed = rng.seeds_tensor([req.seed], device=self.device)
        draw0 = torch.zeros(1, dtype=torch.int64, device=self.device)
        z = ops.randn((1,) + req.shape, seed, draw0, dtype=self.dtype, device=self.device,
                      kernel=self.kernel if self.kernel != "torch" else "torch")
        req.x = (p.init_scale * z)[0]
        req.slots = torch.zeros((p.num_slots,) + req.shape, dtype=self.dtype, device=self.device)

    def _run(self):
        # grad mode and the intra-op thread count are per thread: set them for this one
        torch.set_num_threads(self.cpu_threads)
        with torch.no_grad():
            self._serve()

    def _serve(self):
        while True:
            self._admit()
            if not self._active:
                if self._stop.is_set() and self._queue.empty() and not self._waiting:
                    return
                try:  # sleep until a request arrives
                    self._waiting.append(self._queue.get(timeout=0.05))
                except queue.Empty:
                    pass
                continue
            batch = self._active
            try:
                self._tick(batch)
            except Exception as e:  # the model (or a bad request) failed: fail this batch, keep serving
                for req in batch:
                    if not req.future.done():
                        req.future.set_exception(e)
                self._active = []
                continue
            done = [r for r in batch if r.stage >= r.plan.num_stages]
            self._active = [r for r in batch if r.stage < r.plan.num_stages]
            for r in done:
                try:
                    _check_end(r.x[None], r.plan, "end")
                    r.future.set_result(r.x)
                except FloatingPointError as e:
                    r.future.set_exception(e)

    def _tick(self, batch):
        B = len(batch)
        K = max(r.plan.num_slots for r in batch)
        dev = self.device
        x = torch.stack([r.x for r in batch])
        slots = torch.zeros((K, B) + batch[0].shape, dtype=self.dtype, device=dev)
        for b, r in enumerate(batch):
            if r.plan.num_slots:
                slots[: r.plan.num_slots, b] = r.slots
        rows = np.stack([r.plan.shared_rows(K)[r.stage] for r in batch])
        flags = [r.plan.stage_flags[r.stage] for r in batch]
        use_out = [f[2] for f in flags]
        guided = batch[0].guidance is not None
        out = x
        if any(use_out):
            # stages without a model call (EDM churn prologue) ride along: their rows ignore D (cx = co = 0)
            stage_t = [r.plan.stage_times[r.stage] for r in batch]
            stage_t = [st if not np.isnan(st) else r.plan.times[0] for st, r in zip(stage_t, batch)]
            t = torch.tensor([float(r.plan.schedule.model_time(st)) for st, r in zip(stage_t, batch)],
                             dtype=torch.float32, device=dev)
            cond = {k: torch.stack([r.cond[k] for r in batch]) for k in batch[0].cond}
            if guided:
                uncond = {k: torch.stack([r.uncond[k] for r in batch]) for k in batch[0].cond}
                kw = {k: torch.cat([uncond[k], cond[k]]) for k in cond}
                out = self.model(torch.cat([x, x]), torch.cat([t, t]), **kw)
            else:
                out = self.model(x, t, **cond)
            expect = (2 * B if guided else B,) + tuple(x.shape[1:])
            if tuple(out.shape) != expect:
                raise ValueError(f"the model returned {tuple(out.shape)}, expected {expect}")
            out = out.to(self.dtype).contiguous()
            self.ticks += 1
        reads = (1 << K) - 1
        writes = 0
        for r in batch:
            writes |= r.plan.stage_flags[r.stage][1]
        # slots a request does not write have identity rows, so writing the union is exact for everyone
        x_new = ops.step(
            x.contiguous(), out, slots, torch.as_tensor(rows, dtype=torch.float32, device=dev),
            rng.seeds_tensor([r.seed for r in batch], device=dev),
            torch.tensor([int(r.plan.draw[r.stage]) for r in batch], dtype=torch.int64, device=dev),
            torch.tensor([float(r.guidance) if guided else 0.0 for r in batch], dtype=torch.float32, device=dev),
            slot_reads=reads, slot_writes=writes, use_out=any(use_out), cfg=guided and any(use_out),
            noise=any(f[3] for f in flags), langevin=any(f[4] for f in flags), kernel=self.kernel)
        for b, r in enumerate(batch):
            r.x = x_new[b]
            if r.plan.num_slots:
                r.slots = slots[: r.plan.num_slots, b].clone()
            r.stage += 1
