"""Per-step cost of every common solver at several sizes, with a precomputed model output (sampler cost only).

Solvers: ddim, euler, heun, dpmpp_2m, dpmpp_3m, dpmpp_2m_sde, euler_ancestral (scaled_linear DiscreteVP, 20 steps)
and flow_euler (rectified flow).  Sizes: 1x4x64x64, 2x4x128x128 (a CFG batch), 16x4x128x128 and 1x4M.

Providers (one setup function each, ``PROVIDERS``), all running the whole 20-step loop on the same inputs:

- ``fastdiff-<kernel>``: the plan's stages through ``fastdiff.ops.step`` on this device's kernel (checks, dispatch).
- ``torch-eager``: the same stages as eager torch ops (fastdiff's torch backend, ``ops.step_reference``), noise
  from the torch Philox of ``fastdiff.rng``.
- ``torch-compile``: the flat-row stage in torch ops (``fastdiff.ops.step_reference``, the contract every kernel
  matches, torch Philox included) under ``torch.compile`` (inductor, fullgraph, static shapes).  Coefficients are
  tensors, so it compiles one graph per distinct stage structure (1-6 per solver), not one per step; the compile
  happens in an untimed first run (its seconds are recorded).  ``--quick`` compiles ``QUICK_COMPILE`` only.
- ``diffusers``: the diffusers scheduler doing the same steps (where one maps directly), in diffusers' loop
  (``scale_model_input`` + ``step``), its noise from a torch generator.
- ``k-diffusion``: k-diffusion's sampler (``sample_euler``, ``sample_heun``, ``sample_dpmpp_2m``,
  ``sample_dpmpp_3m_sde`` with eta=0 for dpmpp_3m, ``sample_dpmpp_2m_sde``, ``sample_euler_ancestral``) run over the
  same 20-step grid (k-diffusion's sigma = sigma / alpha of the plan's grid) with a model that returns a precomputed
  denoised tensor; noise from ``default_noise_sampler`` (``torch.randn_like``, k-diffusion's cheapest).  Its time
  is the sampler call minus the trivial model's calls timed alongside, divided by the same stage count as
  fastdiff's (k-diffusion's plan on that grid has the same stage structure, checked), so the ratio is the ratio of
  whole loops.

Correctness before timing: every provider runs the loop once on check inputs (a different random model output per
call, so that multistep history terms count) and its final state must equal fastdiff's kernel on the same inputs
to 1e-4 of the data scale (fp32): torch-eager and torch-compile on the same plan; diffusers against a fastdiff plan
built from the scheduler's own betas and timesteps; k-diffusion against a fastdiff plan built from its sigmas (EDM
schedule, x0 prediction; its check model's D also depends on x, else every loop would end on the last D).
Stochastic checks feed fastdiff's Philox draws to the peer (diffusers' ``randn_tensor`` patched, k-diffusion's
``noise_sampler``).  Timing interleaves the providers (round-robin), so the ratios come from one run side by side.
Reported per step: median and p20/p80 time, effective GB/s (bytes a stage must move: x, out, history reads and
writes) and, for fastdiff, the fraction of the copy bandwidth of the run.

    python benchmarks/bench_step_solvers.py [--quick] [--sizes 1x4x64x64,...] [--no-compile] [--out PATH]
"""

from __future__ import annotations

import argparse
import functools
import inspect
import os
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch._inductor.config

import fastdiff as fd
from fastdiff import ops, rng
from fastdiff.backends import resolve

try:
    from _common import load_k_diffusion, loadavg, source_version, time_interleaved, timeit, write
except ImportError:
    from ._common import load_k_diffusion, loadavg, source_version, time_interleaved, timeit, write

SOLVERS = ["ddim", "euler", "heun", "dpmpp_2m", "dpmpp_3m", "dpmpp_2m_sde", "euler_ancestral", "flow_euler"]
SIZES = [(1, 4, 64, 64), (2, 4, 128, 128), (16, 4, 128, 128), (1, 4 * 2**20)]
STEPS = 20
RTOL = 1e-4  # fp32 agreement, relative to the data scale
# inductor takes ~5 s per solver on 2 cores; --quick compiles only these (the headline solvers)
QUICK_COMPILE = ("ddim", "dpmpp_2m")

SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, timestep_spacing="trailing")
# solver: (diffusers scheduler, its config, fastdiff options matching it); the scheduler steps in y = x / alpha
# for Euler-type ones ("y"), in x otherwise
DIFFUSERS = {
    "ddim": ("DDIMScheduler", dict(SD, set_alpha_to_one=True, clip_sample=False), {}, "x"),
    "euler": ("EulerDiscreteScheduler", SD, {}, "y"),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", dict(SD, final_sigmas_type="zero"), dict(solver_type="midpoint"),
                 "x"),
    "dpmpp_3m": ("DPMSolverMultistepScheduler", dict(SD, solver_order=3, solver_type="heun",
                                                     final_sigmas_type="zero"), dict(solver_type="heun"), "x"),
    "euler_ancestral": ("EulerAncestralDiscreteScheduler", SD, dict(eta=1.0), "y"),
    "flow_euler": ("FlowMatchEulerDiscreteScheduler", {}, {}, "x"),
}
# solver: (k-diffusion sampler, its kwargs, fastdiff options matching it on k-diffusion's grid)
K_DIFFUSION = {
    "euler": ("sample_euler", {}, {}),
    "heun": ("sample_heun", {}, {}),
    "dpmpp_2m": ("sample_dpmpp_2m", {}, dict(lower_order_final=False)),
    "dpmpp_3m": ("sample_dpmpp_3m_sde", dict(eta=0.0), dict(lower_order_final=False, solver_type="heun")),  # ODE 3M
    "dpmpp_2m_sde": ("sample_dpmpp_2m_sde", dict(eta=1.0, solver_type="midpoint"),
                     dict(eta=1.0, solver_type="midpoint", lower_order_final=False)),
    "euler_ancestral": ("sample_euler_ancestral", dict(eta=1.0), dict(eta=1.0)),
}


@dataclass
class Case:
    """What every provider of one (solver, size) gets: the plan, the start state, the model outputs, the seeds.

    ``outs`` (timed) repeats one precomputed output; ``check_outs`` (the correctness check) has a different
    random output per model call, so that the history terms of multistep solvers count in the check (with one
    constant epsilon the trajectory is exact and every D along it is the same).
    """

    solver: str
    shape: tuple
    plan: object
    x0: torch.Tensor
    outs: list
    check_outs: list
    seeds: list
    kernel: str
    compile: bool = True

    @functools.cached_property
    def want(self):
        """fastdiff's final state on the check inputs, the reference of every check."""
        return fused_loop(self.plan, self.x0, self.seeds, self.kernel)(self.check_outs)


@dataclass
class Provider:
    run: object  # the timed call: the whole loop
    refcheck_rel_err: float  # max |provider - fastdiff| / data scale on the check inputs
    baseline: object = None  # timed alongside; its median is subtracted (k-diffusion's trivial model calls)
    noise: str = None  # where a stochastic provider's noise comes from
    compile_seconds: float = None


def check(got, want, what) -> float:
    """max |got - want| relative to the data scale; raises when above RTOL (correctness before timing)."""
    got, want = got.double(), want.double()
    err = float((got - want).abs().max())
    scale = max(1.0, float(want.abs().max()))
    if not err <= RTOL * scale:
        raise AssertionError(f"refcheck failed for {what}: max |diff| {err:.3g} > {RTOL:g} * {scale:.3g}")
    return err / scale


def vp_plan(solver, **options):
    if solver == "flow_euler":
        return fd.plan(solver, fd.schedules.RectifiedFlow(), STEPS, prediction="flow", **options)
    return fd.plan(solver, fd.schedules.DiscreteVP.scaled_linear(), STEPS, prediction="epsilon", **options)


def _stage_tensors(plan, device):
    # one contiguous row / draw per stage: the same arguments each call (no views that a compiled graph guards on)
    rows = torch.tensor(plan.rows(), dtype=torch.float32, device=device)
    return ([rows[k:k + 1].clone() for k in range(plan.num_stages)],
            [torch.tensor([int(d)], device=device) for d in plan.draw])


def fused_loop(plan, x0, seeds, kernel):
    """fastdiff: ``loop(outs)`` runs every stage of ``plan`` through ``fastdiff.ops.step``, ``outs[k]`` the model
    output of stage k (every stage of these solvers calls the model)."""
    rows, draws = _stage_tensors(plan, x0.device)
    seeds_t = rng.seeds_tensor(seeds, device=x0.device)
    slots = torch.zeros((plan.num_slots,) + tuple(x0.shape), device=x0.device)

    def loop(outs):
        x = x0
        for k in range(plan.num_stages):
            rd, wr, uo, nz, lg = plan.stage_flags[k]
            x = ops.step(x, outs[k], slots, rows[k], seeds_t, draws[k], slot_reads=rd, slot_writes=wr, use_out=uo,
                         noise=nz, langevin=lg, kernel=kernel)
        return x

    return loop


# ---------------------------------------------------------------------------------------------------------------
# Providers: setup(case) -> Provider, or None where the provider has no such solver
# ---------------------------------------------------------------------------------------------------------------


def setup_fastdiff(c: Case):
    loop = fused_loop(c.plan, c.x0, c.seeds, c.kernel)
    return Provider(lambda: loop(c.outs), 0.0, noise="Philox in the kernel" if c.plan.num_draws > 1 else None)


def setup_torch_eager(c: Case):
    loop = fused_loop(c.plan, c.x0, c.seeds, "torch")  # the torch backend: ops.step_reference, eager
    return Provider(lambda: loop(c.outs), check(loop(c.check_outs), c.want, "torch-eager"),
                    noise="torch Philox (fastdiff.rng)" if c.plan.num_draws > 1 else None)


def setup_torch_compile(c: Case):
    if not c.compile:
        return None
    plan = c.plan
    torch._dynamo.reset()  # a fresh cache per case: each call walks the guards of the graphs cached so far
    step = torch.compile(ops.step_reference, backend="inductor", fullgraph=True, dynamic=False)
    rows, draws = _stage_tensors(plan, c.x0.device)
    seeds_t = rng.seeds_tensor(c.seeds, device=c.x0.device)
    slots = torch.zeros((plan.num_slots,) + tuple(c.shape), device=c.x0.device)
    guidance = torch.zeros(1, device=c.x0.device)

    def loop(outs):
        x = c.x0
        for k in range(plan.num_stages):
            rd, wr, uo, nz, lg = plan.stage_flags[k]
            x = step(x, outs[k], slots, rows[k], seeds_t, draws[k], guidance, rd, wr, uo, False, nz, lg)
        return x

    t0 = time.perf_counter()
    got = loop(c.check_outs)  # compiles one graph per distinct stage structure
    return Provider(lambda: loop(c.outs), check(got, c.want, "torch-compile"),
                    compile_seconds=time.perf_counter() - t0,
                    noise="torch Philox, compiled" if plan.num_draws > 1 else None)


def _diffusers_loop(sched, x, outs, generator=None):
    """diffusers' loop with precomputed model outputs: scale_model_input (part of the loop) and step."""
    kw = {"generator": generator} if generator is not None else {}
    for i, t in enumerate(sched.timesteps):
        if hasattr(sched, "scale_model_input"):  # DDIM / DPMSolver: identity; FlowMatch has none
            sched.scale_model_input(x, t)
        x = sched.step(outs[i], t, x, **kw).prev_sample
    return x


def setup_diffusers(c: Case):
    if c.solver not in DIFFUSERS:
        return None
    import diffusers

    cls_name, config, options, space = DIFFUSERS[c.solver]
    cls = getattr(diffusers, cls_name)
    sched = cls(**config)
    sched.set_timesteps(STEPS)
    # fastdiff on diffusers' own grid and betas
    if c.solver == "flow_euler":
        plan = fd.plan("flow_euler", fd.schedules.RectifiedFlow(), prediction="flow", final="zero",
                       timesteps=sched.timesteps.double().numpy() / 1000.0)  # diffusers' t is sigma * 1000
    else:
        plan = fd.plan(c.solver, fd.schedules.DiscreteVP(betas=sched.betas.double().numpy()), prediction="epsilon",
                       timesteps=sched.timesteps.double().numpy(), final="zero", **options)
    assert plan.stage_flags == c.plan.stage_flags, "diffusers' grid changed the stage structure"
    y0 = c.x0 * float(getattr(sched, "init_noise_sigma", 1.0))
    scale = plan.alphas[0] if space == "y" else 1.0  # fastdiff's state is x = alpha y
    want = fused_loop(plan, y0 * float(scale), c.seeds, c.kernel)(c.check_outs)
    module = sys.modules[cls.__module__]
    patched = "randn_tensor" in vars(module) and plan.num_draws > 1
    if patched:  # the check gets fastdiff's Philox draws where diffusers draws its noise
        noises = iter([rng.randn(c.shape, c.seeds, draw=int(d)) if d >= 0 else torch.zeros(c.shape)
                       for d in plan.draw])
        saved = module.randn_tensor
        module.randn_tensor = lambda shape, *a, dtype=None, **kw: next(noises).to(dtype or torch.float32)
    try:
        got = _diffusers_loop(sched, y0, c.check_outs)
    finally:
        if patched:
            module.randn_tensor = saved
    err = check(got * float(plan.alphas[-1] if space == "y" else 1.0), want, "diffusers")
    generator = torch.Generator(device=c.x0.device) if plan.num_draws > 1 else None

    def run():
        sched.set_timesteps(STEPS)  # resets the multistep history and the step index
        if generator is not None:
            generator.manual_seed(0)
        return _diffusers_loop(sched, c.x0, c.outs, generator)

    return Provider(run, err, noise="torch generator" if generator is not None else None)


_KD = {}


def setup_k_diffusion(c: Case):
    if c.solver not in K_DIFFUSION:
        return None
    if "module" not in _KD:
        try:
            _KD["module"] = load_k_diffusion()
        except ImportError as e:  # scipy / tqdm missing
            print(f"(k-diffusion skipped: {e})")
            _KD["module"] = None
    kd = _KD["module"]
    if kd is None:
        return None
    name, kwargs, options = K_DIFFUSION[c.solver]
    sample = getattr(kd, name)
    sig = c.plan.sigmas / c.plan.alphas  # k-diffusion's sigma: sigma / alpha, ending at 0
    plan = fd.plan(c.solver, fd.schedules.EDM(), sigmas=sig, prediction="x0", **options)
    # the same kernel work per stage as the row's plan, so the same stage count divides both loops
    assert plan.stage_flags == c.plan.stage_flags, "k-diffusion's plan has another stage structure"
    sigmas = torch.tensor(sig, dtype=torch.float32, device=c.x0.device)
    y0 = c.x0 * sigmas[0]
    denoised = c.outs[0]

    def model(x, sigma, **extra):  # the timed model: a precomputed denoised tensor
        return denoised

    calls = []

    def check_model(x, sigma, **extra):
        # a different output per call, plus a term in x: with D independent of x, every loop would end on the last D
        s = sigma.to(x.dtype).reshape((-1,) + (1,) * (x.dim() - 1))
        calls.append(None)
        return c.check_outs[len(calls) - 1] + x / (1 + s * s)

    takes_noise = "noise_sampler" in inspect.signature(sample).parameters  # (the 3M sampler even at eta = 0)
    kwargs_run = dict(kwargs, noise_sampler=kd.default_noise_sampler(y0)) if takes_noise else kwargs
    kwargs_check = kwargs_run
    stochastic = plan.num_draws > 1
    if stochastic:  # the check gets fastdiff's Philox draws in the order k-diffusion asks for noise
        draws = iter([rng.randn(c.shape, c.seeds, draw=d) for d in range(1, plan.num_draws)])
        kwargs_check = dict(kwargs, noise_sampler=lambda s, s_next: next(draws))
    got = sample(check_model, y0, sigmas, disable=True, **kwargs_check)
    calls.clear()
    want = fd.sample(check_model, plan, x_T=y0, seeds=c.seeds, backend=c.kernel)
    err = check(got, want, "k-diffusion")
    sigma_in = sigmas[0] * y0.new_ones([y0.shape[0]])

    def model_alone():  # the model calls the sampler makes, without the sampler
        for _ in range(plan.nfe):
            model(y0, sigma_in)

    return Provider(lambda: sample(model, y0, sigmas, disable=True, **kwargs_run), err, baseline=model_alone,
                    noise="torch.randn_like (default_noise_sampler)" if stochastic else None)


PROVIDERS = {"fastdiff": setup_fastdiff, "torch-eager": setup_torch_eager, "torch-compile": setup_torch_compile,
             "diffusers": setup_diffusers, "k-diffusion": setup_k_diffusion}


def stage_bytes(plan, k, numel, elem):
    reads, writes, use_out, _, _ = plan.stage_flags[k]
    arrays = 2 + int(use_out) + bin(reads).count("1") + bin(writes).count("1")  # x in/out, out, slots
    return arrays * numel * elem


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1x4x64x64 only, fewer repeats, compile ddim / dpmpp_2m")
    parser.add_argument("--sizes", help="comma-separated shapes such as 1x4x64x64,1x4194304")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile provider")
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    sizes = ([tuple(int(n) for n in s.split("x")) for s in args.sizes.split(",")] if args.sizes
             else SIZES[:1] if args.quick else SIZES)
    repeats = 3 if args.quick else 11
    kernel = resolve("auto", "cuda" if torch.cuda.is_available() else "cpu")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    sync = torch.cuda.synchronize if dev == "cuda" else None
    torch._dynamo.config.recompile_limit = 64  # one graph per stage structure; never fall back to eager silently
    # compile in this process: inductor's worker pool starts in the background and competes with the timing
    torch._inductor.config.compile_threads = 1
    if args.no_compile:
        print("(torch-compile skipped: --no-compile)")
    elif args.quick:
        print(f"(--quick: torch-compile for {', '.join(QUICK_COMPILE)} only; inductor takes ~5 s per solver)")
    load0, source = loadavg(), source_version()  # at the start: others may commit while this runs
    rows = []
    for shape in sizes:
        numel = int(np.prod(shape))
        src, dst = torch.randn(shape, device=dev), torch.empty(shape, device=dev)
        copy = timeit(lambda: dst.copy_(src), repeats=repeats, sync=sync)["median"]
        copy_gbs = 2 * numel * 4 / copy / 1e9
        g = torch.Generator(device=dev).manual_seed(0)
        x0 = torch.randn(shape, device=dev, generator=g)
        out = torch.randn(shape, device=dev, generator=g)
        check_outs = [torch.randn(shape, device=dev, generator=g) for _ in range(2 * STEPS)]  # Heun: 2 calls a step
        for solver in SOLVERS:
            plan = vp_plan(solver)
            assert plan.nfe == plan.num_stages <= len(check_outs)  # every stage calls the model
            case = Case(solver, shape, plan, x0, [out] * plan.num_stages, check_outs, list(range(shape[0])), kernel,
                        compile=not args.no_compile and (not args.quick or solver in QUICK_COMPILE))
            providers = {}
            for name, setup in PROVIDERS.items():
                p = setup(case)  # runs the provider's correctness check
                if p is not None:
                    providers["fastdiff-" + kernel if name == "fastdiff" else name] = p
            timed = {name: p.run for name, p in providers.items()}
            timed.update({name + " (model alone)": p.baseline for name, p in providers.items() if p.baseline})
            times = time_interleaved(timed, repeats=repeats if numel <= 2**20 else 5, warmup=1, sync=sync)
            nbytes = sum(stage_bytes(plan, k, numel, 4) for k in range(plan.num_stages))
            by = {}
            for name, p in providers.items():
                t = times[name]
                base = times[name + " (model alone)"]["median"] if p.baseline else 0.0
                per = {q: (t[q] - base) / plan.num_stages for q in ("median", "p20", "p80")}
                gbs = nbytes / (per["median"] * plan.num_stages) / 1e9
                row = dict(bench="step_solvers", solver=solver, shape=list(shape), provider=name,
                           stages=plan.num_stages, time_per_step=per, gbps=gbs,
                           fraction_of_copy=gbs / copy_gbs if name.startswith("fastdiff") else None,
                           copy_gbps=copy_gbs, refcheck_rel_err=p.refcheck_rel_err, noise=p.noise)
                if p.baseline:
                    row["model_time_subtracted"] = base
                if p.compile_seconds is not None:
                    row["compile_seconds"] = p.compile_seconds
                rows.append(row)
                by[name] = row
            ours = by["fastdiff-" + kernel]
            ratio = "  ".join(f"{p} x{by[p]['time_per_step']['median'] / ours['time_per_step']['median']:.1f}"
                              for p in by if p != ours["provider"])
            print(f"{'x'.join(map(str, shape)):>14s} {solver:16s} {1e6 * ours['time_per_step']['median']:9.1f} us/step"
                  f"  {ours['gbps']:6.1f} GB/s ({ours['fraction_of_copy']:.2f} of copy)  {ratio}", flush=True)
    load1 = loadavg()
    print(f"(1-min load average {load0:.2f} -> {load1:.2f})")
    if load0 > 0.6 * (os.cpu_count() or 1):  # at the start, before this script's own threads count
        print("WARNING: the machine was busy: OpenMP regions wait for descheduled threads, so these timings (and, "
              "less so, the interleaved ratios) are not representative")
    path = write("step_solvers_quick" if args.quick else "step_solvers", rows, args.out,
                 extra={"loadavg_1min": [load0, load1], **source})
    print(f"wrote {path}")
    return rows


if __name__ == "__main__":
    main()
