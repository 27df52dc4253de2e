"""Continuous batching for serving: requests at different steps of different plans share one model call and one
step launch per tick, and no request can take another one down.

Each request has its own plan, seed, conditioning and guidance weight.  Between ticks new requests join the
running batch and finished ones leave.  A tick makes ONE model call over all active requests (each at its own
model time) and ONE ``fastdiff::step`` launch with per-sample coefficient rows; plans with fewer history slots
are embedded in the largest slot layout of the tick (``Plan.shared_rows``: identity rows for slots they do not
write), so every request computes exactly what it would compute alone.

Requests batch together when they share the sample shape, conditioning keys / shapes / dtypes, and whether
guidance is on (their *kind*).  Guarantees (each one tested in tests/test_serving_faults.py):

- every submitted future ends: with its sample, its own exception, or ``CancelledError``;
- bad input is refused by ``submit`` with a ValueError; what still fails when a request starts fails it alone;
- ``Future.cancel()`` works while the request waits or samples; its rows leave the batch at the next tick;
- a model exception or a non-finite result is traced to the requests it belongs to by rerunning the tick in
  halves: those fail, the others go on with the result they would have had alone;
- ``max_queue`` bounds every accepted and unfinished request (waiting or sampling); beyond it ``submit`` raises
  ``QueueFull`` at once (it never blocks: a server answers 503 and the client retries);
- a request with a ``timeout`` (or the batcher's ``request_timeout``) fails with ``TimeoutError`` at the first
  tick after its deadline;
- fairness: admission is FIFO within a kind; a request of another kind than the running batch waits at most
  ``max_wait_ticks`` ticks, then no more requests are admitted until the running batch drains and its kind runs;
- ``close(drain=True)`` finishes every request, ``close(drain=False)`` cancels them; either way all futures end;
- the worker thread is supervised: an error of the loop itself fails only the requests in flight and the loop
  starts again.
"""

from __future__ import annotations

import collections
import collections.abc
import math
import operator
import threading
import time
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass

import numpy as np
import torch

from .. import ops, rng
from ..backends import resolve
from ..plan import Plan


class QueueFull(RuntimeError):
    """``max_queue`` requests are accepted and unfinished: retry later, or create the batcher with a larger
    ``max_queue``."""


QueueFullError = QueueFull  # the earlier name


class BatcherClosed(RuntimeError):
    """``submit`` after ``close``."""


@dataclass(eq=False)
class _Request:
    plan: Plan
    seed: int
    shape: tuple
    cond: dict
    uncond: dict
    guidance: float | None
    future: Future
    key: tuple
    deadline: float  # time.monotonic() bound, math.inf for none
    timeout: float | None
    enqueued_tick: int
    x: torch.Tensor | None = None
    slots: torch.Tensor | None = None
    stage: int = 0


class ContinuousBatcher:
    """A supervised background loop that serves sampling requests with continuous batching.

    Parameters
    ----------
    model : callable
        ``model(x [B, ...], t [B], **cond) -> out [B, ...]``; t holds each request's own model time.  Give it a
        batch-invariant model (each row's output depends only on that row) for results equal to sampling alone.
    max_batch : int
        Requests sampled together at most (with guidance the model sees 2 * max_batch rows).
    backend : str
        Step backend ("auto": the fused kernel for the device; float64 runs on "torch").
    max_queue : int
        Accepted and unfinished requests at most (waiting plus sampling); ``submit`` raises ``QueueFull`` beyond.
    device, dtype
        Where and in which floating dtype samples are computed (checked here: an unavailable device or an integer
        dtype is a ValueError).
    cpu_threads : int, optional
        Intra-op threads of the batcher's own thread (``torch.set_num_threads`` there; the caller's setting is
        untouched). Default: the caller's count. On some CPU builds torch's OpenMP regions are much slower on a
        thread other than the main one with more than one thread; ``cpu_threads=1`` avoids that.
    request_timeout : float, optional
        Default per-request timeout in seconds (``submit(timeout=)`` overrides it); None: no timeout.
    max_numel : int
        Elements of one sample at most (a guard against shapes that would exhaust memory).
    max_wait_ticks : int
        Fairness bound: ticks a request of another kind than the running batch waits before the batch drains.

    Use as a context manager: ``with ContinuousBatcher(model) as b: fut = b.submit(plan, seed, shape)``.
    """

    def __init__(self, model, max_batch: int = 16, backend: str = "auto", max_queue: int = 256, device="cpu",
                 dtype=torch.float32, cpu_threads: int | None = None, request_timeout: float | None = None,
                 max_numel: int = 1 << 24, max_wait_ticks: int = 32):
        for name, value in (("max_batch", max_batch), ("max_queue", max_queue), ("max_numel", max_numel),
                            ("max_wait_ticks", max_wait_ticks)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if cpu_threads is not None and (isinstance(cpu_threads, bool) or not isinstance(cpu_threads, int)
                                        or cpu_threads < 1):
            raise ValueError(f"cpu_threads must be an integer >= 1, got {cpu_threads!r}")
        self.request_timeout = _check_timeout(request_timeout, "request_timeout")
        if dtype not in ops.FLOAT_DTYPES:
            raise ValueError(f"dtype must be a floating dtype ({', '.join(map(str, ops.FLOAT_DTYPES))}), got {dtype!r}")
        self.device, self.dtype = _check_device(device), dtype
        if dtype == torch.float64:  # the fused kernels compute in float32
            if backend not in ("auto", "torch"):
                raise ValueError(f"dtype float64 runs on backend 'torch' only, got backend={backend!r}")
            backend = "torch"
        self.kernel = resolve(backend, self.device.type)
        self.cpu_threads = torch.get_num_threads() if cpu_threads is None else cpu_threads
        self.model, self.max_batch, self.max_queue = model, max_batch, max_queue
        self.max_numel, self.max_wait_ticks = max_numel, max_wait_ticks
        self._lock = threading.RLock()
        self._wake = threading.Condition(self._lock)
        self._pending: collections.deque[_Request] = collections.deque()  # accepted, not started (FIFO)
        self._active: list[_Request] = []  # sampling
        self._unfinished = 0  # accepted requests whose future has not ended
        self._closing = False
        self._drain = True
        self._thread: threading.Thread | None = None
        self._done = False  # the loop returned after close
        self.ticks = 0  # model calls made
        self._checked = set()  # (x's shape, slots, use_out, cfg): layouts whose step arguments ops.step checked
        self.steps = 0  # batch steps (ticks with or without a model call)
        self.stats = collections.Counter()  # submitted, completed, cancelled, timed_out, rejected, restarts, rows, ...
        self.errors = collections.Counter()  # failed requests by exception class name

    # -- lifecycle -----------------------------------------------------------------------------------------------
    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.close()

    def start(self):
        with self._lock:
            if self._thread is None and not self._done:
                self._thread = threading.Thread(target=self._run, name="fastdiff-batcher", daemon=True)
                self._thread.start()
        return self

    def close(self, drain: bool = True, timeout: float | None = None):
        """Stop accepting requests; with ``drain`` finish every accepted one, else cancel them; then stop the loop.

        Every future has ended when this returns (unless ``timeout`` seconds passed first while draining).
        """
        with self._lock:
            self._closing = True
            self._drain = self._drain and drain
            self._wake.notify_all()
            if self._thread is None and not self._done:
                if not self._pending:
                    self._done = True
                    return
                self.start()  # run the loop once to drain (or cancel) what was submitted before start()
            thread = self._thread
        self._ensure_worker()
        if thread is not None:
            thread.join(timeout)

    @property
    def closed(self) -> bool:
        return self._closing

    def alive(self) -> bool:
        """The loop runs (or was never started) and accepts requests."""
        return not self._closing and (self._thread is None or self._thread.is_alive())

    def queue_depth(self) -> int:
        """Requests accepted and not started yet."""
        return len(self._pending)

    def active(self) -> int:
        """Requests sampling now."""
        return len(self._active)

    def unfinished(self) -> int:
        """Requests accepted whose futures have not ended (what ``max_queue`` bounds)."""
        return self._unfinished

    # -- API -----------------------------------------------------------------------------------------------------
    def submit(self, plan: Plan, seed: int, shape, cond=None, uncond=None, guidance_scale=None,
               timeout: float | None = None) -> Future:
        """Queue one sample; returns a Future resolving to a tensor of ``shape`` (thread-safe).

        Parameters
        ----------
        plan : Plan
        seed : int in [0, 2**64)
        shape : tuple of positive ints, the shape of ONE sample (no batch dimension)
        cond, uncond : dict of tensors for one sample (no batch dimension); uncond only with guidance
        guidance_scale : float, optional
            Classifier-free guidance weight; then cond and uncond must have the same keys and shapes.
        timeout : float, optional
            Seconds until the request fails with TimeoutError (default: the batcher's ``request_timeout``).

        Raises ValueError for bad input, ``QueueFull`` when ``max_queue`` requests are unfinished,
        ``BatcherClosed`` after ``close``.
        """
        if not isinstance(plan, Plan):
            raise ValueError(f"plan must be a fastdiff Plan (from fastdiff.plan(...)), got {type(plan).__name__}")
        if plan.uncond_column:  # its rows have CFG++'s U column, which the shared launch of a tick does not lay out
            raise ValueError(f"the batcher does not run CFG++ plans (guidance='cfg++', solver {plan.solver!r}): "
                             "submit the plain solver's plan, or sample CFG++ with fastdiff.sample / Sampler")
        seed = rng.check_seed(seed)
        shape = self._check_shape(shape)
        guided = guidance_scale is not None
        if guided:
            try:
                guidance_scale = float(guidance_scale)
            except (TypeError, ValueError):
                raise ValueError(f"guidance_scale must be a number, got {guidance_scale!r}") from None
            if not math.isfinite(guidance_scale):
                raise ValueError(f"guidance_scale must be finite, got {guidance_scale}")
        cond = self._check_cond(cond, "cond")
        uncond = self._check_cond(uncond, "uncond") if guided else {}
        if guided:
            if set(cond) != set(uncond):
                raise ValueError(f"with guidance_scale, cond and uncond must have the same keys, got {sorted(cond)} "
                                 f"and {sorted(uncond)}")
            for k in cond:
                if cond[k].shape != uncond[k].shape or cond[k].dtype != uncond[k].dtype:
                    raise ValueError(f"cond[{k!r}] is {cond[k].dtype} {tuple(cond[k].shape)} but uncond[{k!r}] is "
                                     f"{uncond[k].dtype} {tuple(uncond[k].shape)}: they are batched together")
        timeout = _check_timeout(timeout, "timeout")
        if timeout is None:
            timeout = self.request_timeout
        key = (shape, guided, tuple((k, tuple(v.shape), v.dtype) for k, v in sorted(cond.items())))
        fut: Future = Future()
        with self._lock:
            if self._closing:
                raise BatcherClosed("the batcher is closed: create a new one")
            if self._unfinished >= self.max_queue:
                self.stats["rejected"] += 1
                raise QueueFull(f"the batcher's queue is full: {self._unfinished} unfinished requests (max_queue="
                                f"{self.max_queue}); retry later or create it with a larger max_queue")
            deadline = math.inf if timeout is None else time.monotonic() + timeout
            req = _Request(plan, seed, shape, cond, uncond, guidance_scale, fut, key, deadline, timeout, self.steps)
            self._unfinished += 1
            self.stats["submitted"] += 1
            fut.add_done_callback(self._on_done)
            self._pending.append(req)
            self._wake.notify_all()
        self._ensure_worker()
        return fut

    def _check_shape(self, shape):
        try:
            shape = tuple(operator.index(s) for s in shape)
        except TypeError:
            raise ValueError(f"shape must be a tuple of ints (one sample, no batch dimension), got {shape!r}") from None
        if not shape or any(s < 1 for s in shape):
            raise ValueError(f"shape must be a non-empty tuple of positive sizes, got {shape}")
        if math.prod(shape) > self.max_numel:
            raise ValueError(f"shape {shape} has {math.prod(shape)} elements, more than max_numel={self.max_numel}: "
                             "sample smaller images or create the batcher with a larger max_numel")
        return shape

    def _check_cond(self, cond, name):
        if cond is None:
            return {}
        if not isinstance(cond, collections.abc.Mapping):
            raise ValueError(f"{name} must be a dict of tensors, got {type(cond).__name__}")
        out = {}
        for k, v in cond.items():
            if not isinstance(v, torch.Tensor):
                raise ValueError(f"{name}[{k!r}] must be a tensor for one sample (no batch dimension), got "
                                 f"{type(v).__name__}")
            out[k] = v.to(self.device)
        return out

    # -- the supervised loop -------------------------------------------------------------------------------------
    def _on_done(self, fut):
        with self._lock:
            self._unfinished -= 1
            self._wake.notify_all()

    def _ensure_worker(self):
        """Restart the loop if its thread died (it catches everything, so only a bug in it gets here)."""
        with self._lock:
            t = self._thread
            if t is None or t.is_alive() or self._done:
                return
            self.stats["restarts"] += 1
            in_flight, self._active = self._active, []
            self._thread = threading.Thread(target=self._run, name="fastdiff-batcher", daemon=True)
            self._thread.start()
        _fail_all(in_flight, RuntimeError("the batcher's loop stopped while this request was in flight; it was "
                                          "restarted: submit the request again"), self.errors)

    def _run(self):
        # grad mode and the intra-op thread count are per thread: set them for this one
        torch.set_num_threads(self.cpu_threads)
        while True:
            try:
                with torch.no_grad():
                    self._serve()
                return
            except BaseException as e:  # a bug of the loop itself (the model's errors are handled per request)
                with self._lock:
                    in_flight, self._active = self._active, []
                    self.stats["restarts"] += 1
                err = RuntimeError(f"internal error of the batcher while this request was in flight ({e!r}); the "
                                   "batcher keeps serving: submit the request again")
                err.__cause__ = e
                _fail_all(in_flight, err, self.errors)

    def _serve(self):
        while True:
            with self._lock:
                ended = self._sweep()
                if self._closing and not self._drain:
                    ended += [(r, None) for r in list(self._pending) + self._active]
                    self._pending.clear()
                    self._active = []
                if not ended:
                    self._admit()
                batch = list(self._active)
                if not batch and not ended:
                    if self._closing and not self._pending:
                        self._done = True
                        return
                    self._wake.wait(0.5)
                    continue
            for r, err in ended:  # outside the lock: futures run their callbacks
                _end(r, err, self.errors, self.stats)
            if ended:
                continue
            self._step(batch)
            self.steps += 1
            # requests that failed or were cancelled during the step leave the batch with the finished ones
            finished = [r for r in batch if r.stage >= r.plan.num_stages or r.future.done()]
            with self._lock:
                self._active = [r for r in self._active if r not in finished]
            for r in finished:
                if r.x is not None and not r.future.done():
                    _end(r, r.x.clone(), self.errors, self.stats)
                elif r.future.cancelled():
                    self.stats["cancelled"] += 1
                r.x = r.slots = None

    def _sweep(self):
        """Drop cancelled requests and fail expired ones; returns [(request, exception or None)] to end."""
        now = time.monotonic()
        ended = []

        def live(requests):
            """The requests neither cancelled (counted) nor expired (put on ``ended``), in order."""
            kept = []
            for r in requests:
                if r.future.done():
                    self.stats["cancelled"] += 1
                elif now >= r.deadline:
                    ended.append((r, _timeout_error(r)))
                else:
                    kept.append(r)
            return kept

        self._pending = collections.deque(live(self._pending))
        self._active = live(self._active)
        return ended

    def _admit(self):
        """Start waiting requests: FIFO within the running kind; another kind's oldest request waits at most
        ``max_wait_ticks`` ticks before admission stops so the running batch drains and that kind goes next."""
        if not self._pending or len(self._active) >= self.max_batch:
            return
        head = self._pending[0]
        key = self._active[0].key if self._active else head.key
        if head.key != key and self.steps - head.enqueued_tick >= self.max_wait_ticks:
            return
        keep = collections.deque()
        for r in self._pending:
            if len(self._active) < self.max_batch and r.key == key:
                if self._start(r):
                    self._active.append(r)
            else:
                keep.append(r)
        self._pending = keep

    def _start(self, req) -> bool:
        """Draw the request's prior; a failure here fails it alone."""
        try:
            p = req.plan
            seed = rng.seeds_tensor([req.seed], device=self.device)
            draw0 = torch.zeros(1, dtype=torch.int64, device=self.device)
            z = ops.randn((1,) + req.shape, seed, draw0, dtype=self.dtype, device=self.device, backend=self.kernel)
            req.x = (p.init_scale * z)[0]
            req.slots = torch.zeros((p.num_slots,) + req.shape, dtype=self.dtype, device=self.device)
            return True
        except Exception as e:
            _end(req, e, self.errors, self.stats)
            return False

    def _step(self, batch):
        """Advance every request of ``batch`` one stage. A failing tick is rerun in halves until the failing
        requests are found; they fail alone and the others advance exactly as they would have in a full tick."""
        try:
            x_new, slots, finite = self._tick(batch)
        except Exception as e:
            if len(batch) == 1:
                _end(batch[0], e, self.errors, self.stats)
                return
            x_new = None
        else:
            if not finite.all():
                if len(batch) == 1:
                    r = batch[0]
                    _end(r, FloatingPointError(
                        f"the sample has NaN or Inf after stage {r.stage} of {r.plan.solver!r} (seed {r.seed}): "
                        "check the model and the prediction type"), self.errors, self.stats)
                    return
                x_new = None
        if x_new is None:  # find the culprits: each half alone
            h = len(batch) // 2
            self._step(batch[:h])
            self._step(batch[h:])
            return
        for b, r in enumerate(batch):
            r.x = x_new[b]
            if r.plan.num_slots:
                r.slots = slots[: r.plan.num_slots, b].clone()
            r.stage += 1

    def _tick(self, batch):
        """One stage of every request in ``batch``, without changing them: (x [B, ...], slots [K, B, ...],
        finite [B] bool) of the new states."""
        B = len(batch)
        K = max(r.plan.num_slots for r in batch)
        dev = self.device
        x = torch.stack([r.x for r in batch])
        slots = torch.zeros((K, B) + batch[0].shape, dtype=self.dtype, device=dev)
        for b, r in enumerate(batch):
            if r.plan.num_slots:
                slots[: r.plan.num_slots, b] = r.slots
        rows = np.stack([r.plan.shared_rows(K)[r.stage] for r in batch])
        flags = batch[0].plan.stage_flags[batch[0].stage].union(*(r.plan.stage_flags[r.stage] for r in batch[1:]))
        guided = batch[0].guidance is not None
        out = x
        if flags.use_out:
            # stages without a model call (EDM churn prologue) ride along: their rows ignore D (cx = co = 0)
            stage_t = [r.plan.stage_times[r.stage] for r in batch]
            stage_t = [st if not np.isnan(st) else r.plan.times[0] for st, r in zip(stage_t, batch)]
            tdtype = torch.float64 if self.dtype == torch.float64 else torch.float32
            t = torch.tensor([float(r.plan.schedule.model_time(st)) for st, r in zip(stage_t, batch)],
                             dtype=tdtype, device=dev)
            cond = {k: torch.stack([r.cond[k] for r in batch]) for k in batch[0].cond}
            self.ticks += 1
            self.stats["rows"] += B
            if guided:
                uncond = {k: torch.stack([r.uncond[k] for r in batch]) for k in cond}
                kw = {k: torch.cat([uncond[k], cond[k]]) for k in cond}
                out = self.model(torch.cat([x, x]), torch.cat([t, t]), **kw)
            else:
                out = self.model(x, t, **cond)
            expect = (2 * B if guided else B,) + tuple(x.shape[1:])
            if not isinstance(out, torch.Tensor) or tuple(out.shape) != expect:
                got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                raise ValueError(f"the model returned {got}, expected a tensor of shape {expect}")
            out = out.to(device=dev, dtype=self.dtype).contiguous()
        # slots a request does not write have identity rows, so writing the union is exact for everyone
        args = (x.contiguous(), out, slots, torch.as_tensor(rows, dtype=torch.float32, device=dev),
                rng.seeds_tensor([r.seed for r in batch], device=dev),
                torch.tensor([int(r.plan.draw[r.stage]) for r in batch], dtype=torch.int64, device=dev),
                torch.tensor([r.guidance if guided else 0.0 for r in batch], dtype=torch.float32, device=dev),
                (1 << K) - 1, int(flags.slot_writes), bool(flags.use_out), bool(guided and flags.use_out),
                bool(flags.noise), bool(flags.langevin))
        layout = (x.shape, K, args[9], args[10])
        if layout in self._checked and type(out) is torch.Tensor:  # the tick's tensors are made here, in this layout
            x_new = ops._step_kernel(self.kernel)(*args, None, None, None)
        else:  # the first tick of a layout: the public op checks every argument
            x_new = ops.step(*args[:7], slot_reads=args[7], slot_writes=args[8], use_out=args[9], cfg=args[10],
                             noise=args[11], langevin=args[12], backend=self.kernel)
            self._checked.add(layout)
        finite = torch.isfinite(x_new.reshape(B, -1)).all(1)
        if K:
            finite &= torch.isfinite(slots.transpose(0, 1).reshape(B, -1)).all(1)
        return x_new, slots, finite.cpu()


def _check_timeout(value, name):
    if value is None:
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number of seconds, got {value!r}") from None
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a positive, finite number of seconds, got {value}")
    return value


def _check_device(device) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device {device!r} is not a torch device: {e}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} needs CUDA, which is not available here: use device='cpu'")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: there are {torch.cuda.device_count()} CUDA devices")
    elif dev.type != "cpu":
        raise ValueError(f"device {device!r}: the batcher runs on 'cpu' or 'cuda'")
    return dev


def _timeout_error(r):
    return TimeoutError(f"the request did not finish within its timeout of {r.timeout:g} s (stage {r.stage} of "
                        f"{r.plan.num_stages}): retry with a longer timeout or when the service is less busy")


def _end(r, value, errors, stats):
    """End a request's future: an exception fails it, None cancels it, a tensor is its result."""
    fut = r.future
    try:
        if isinstance(value, BaseException):
            fut.set_exception(value)
            errors[type(value).__name__] += 1
            if isinstance(value, TimeoutError):
                stats["timed_out"] += 1
        elif value is None:
            if fut.cancel():
                stats["cancelled"] += 1
        else:
            fut.set_result(value)
            stats["completed"] += 1
    except InvalidStateError:  # cancelled by its owner meanwhile
        pass
    r.x = r.slots = None  # free the rows


def _fail_all(reqs, err, errors):
    for r in reqs:
        _end(r, err, errors, collections.Counter())
