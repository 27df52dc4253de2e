"""Sigma-indexed schedulers: the plan runs on diffusers' own noise levels ``self.sigmas`` (sigma / alpha): the
Euler family, Heun, DPM-Solver multistep / singlestep, UniPC."""

from __future__ import annotations

import numpy as np
import torch

from ...plan import StageFlags, identity_row
from ...plan import plan as make_plan
from ...schedules import RectifiedFlow
from ._base import GAIN, PREDICTION, _d, _FastdiffStep, _Program, _stagewise, _unsupported


def _mean_part(config, model_output):
    """diffusers' DPM-Solvers keep the first 3 channels of a noise prediction whose model also predicts its variance
    (variance_type "learned" / "learned_range")."""
    if config.variance_type in ("learned", "learned_range") and config.prediction_type == "epsilon":
        return model_output[:, :3]
    return model_output


class _SigmaScheduler(_FastdiffStep):
    _stateful = True
    _one_step = False  # each step a plan of its own (no history): Euler, Euler ancestral

    def _fd_solver(self, begin, eta=None):  # pragma: no cover - abstract
        """(solver name, plan options) of the program from call ``begin``; ``eta``: the program key's second entry
        (what ``step`` passed beyond the schedule, e.g. LMS's order; None: the default)."""
        raise NotImplementedError

    def _fd_sigmas(self, begin):
        """diffusers' sigmas of the step calls from ``begin`` on, with the end of the last one (log-linear Euler
        carries one more sigma that no step reaches)."""
        return self._fd_sig_host[begin : len(self._fd_ts_host) + 1]

    def _fd_flow(self) -> bool:
        """use_flow_sigmas: diffusers' sigmas are flow times, alpha = 1 - sigma, sigma_t = sigma."""
        return bool(getattr(self.config, "use_flow_sigmas", False))

    def _fd_schedule(self):
        if not self._fd_flow():
            return super()._fd_schedule()
        sig = self._fd_sig_host  # t_min below the smallest sigma diffusers reaches
        return RectifiedFlow(t_min=min(1e-3, float(sig[sig > 0].min())), t_max=max(1.0, float(sig.max())))

    def _fd_grid(self, begin):
        """The plan's k-diffusion sigmas (sigma / alpha) from step ``begin`` on (with the final value)."""
        sig = self._fd_sigmas(begin)
        return sig / (1.0 - sig) if self._fd_flow() else sig

    def _fd_build(self, begin, eta):
        grid = np.array(self._fd_grid(begin), dtype=np.float64)
        ts = self._fd_ts_host[begin:]
        solver, opts = self._fd_solver(begin, eta)
        # diffusers may step between equal noise levels, where every update leaves x as is: the last step with
        # final_sigmas_type="sigma_min" on Karras / exponential / beta / Lu sigmas, and a timestep that rounding
        # repeats (DPM-Solver's set_timesteps(1000); diffusers' next step divides by the zero step there, NaN)
        still = np.flatnonzero(grid[1:] == grid[:-1]) if len(grid) == len(ts) + 1 else np.zeros(0, dtype=int)
        final_still = still.size > 0 and still[-1] == len(ts) - 1 and grid[-1] > 0
        if final_still:
            # the last step, an identity, as a step of relative length 1e-9 (the plan's grid is strictly decreasing),
            # so that the orders of the steps before it are diffusers' (and UniPC's corrector still runs)
            grid[-1] *= 1.0 - 1e-9
            still = still[:-1]
        if still.size:  # the plan skips them; those calls get an identity row
            grid = np.delete(grid, still + 1)
            if "orders" in opts:  # singlestep: the groups 1, 2(, 3) of the steps that remain
                kept = np.delete(np.asarray(opts["orders"]), still).tolist()
                for j in range(1, len(kept)):
                    if kept[j] != kept[j - 1] + 1:
                        kept[j] = 1
                opts["orders"] = tuple(kept)
        sched, pred = self._fd_schedule(), PREDICTION[self.config.prediction_type]
        try:
            p = make_plan(solver, sched, prediction=pred, sigmas=list(grid), **opts)
        except ValueError:
            if not self._one_step:
                raise
            # e.g. the training sigmas of rescale_betas_zero_snr rise from t = 999 (diffusers' alpha_bar = 2**-24
            # stand-in) to t = 998: those steps are refused, the others run
            rows, flags, draws, refused = _stagewise(
                lambda k: make_plan(solver, sched, prediction=pred, sigmas=list(grid[k : k + 2]), **opts), len(ts))
            return _Program(rows, flags, draws, 0, ts, peer_draws=self._fd_peer_draws(len(ts)), refused=refused,
                            **self._fd_fold(begin))
        if p.num_stages != len(ts) - still.size or not all(p.calls_model):  # one model call per diffusers step
            raise AssertionError(f"{solver} plan has {p.num_stages} stages for {len(ts)} timesteps")
        rows, flags, draws = list(p.shared_rows()), list(p.stage_flags), list(p.draw)
        for k in still:
            rows.insert(k, identity_row(p.num_slots))
            flags.insert(k, StageFlags(0, 0, False, False, False))
            draws.insert(k, -1)
        if final_still:  # no noise on the identity step (its nudge would give sqrt(2e-9) of it)
            rows[-1] = rows[-1].copy()
            rows[-1][GAIN] = 0.0
            flags[-1] = flags[-1]._replace(noise=False)
            draws[-1] = -1
        return _Program(rows, flags, draws, p.num_slots, ts, peer_draws=self._fd_peer_draws(len(ts)),
                        **self._fd_fold(begin))

    def _fd_peer_draws(self, n):
        return [False] * n

    def _fd_fold(self, begin):
        return {}

    def _fd_levels_for(self, timesteps, device):
        """(alpha, sigma) at the sigmas of ``timesteps``, indexed as diffusers' add_noise does (by timestep before
        set_begin_index, else at the current step / the begin index)."""
        sig = self._fd_table("sigmas", lambda: self._fd_sig_host, device)
        ts = self._fd_table("timesteps", lambda: self._fd_ts_host, device)
        t = torch.as_tensor(timesteps, device=device).to(torch.float64).reshape(-1)
        if self.begin_index is None:
            idx = (ts[None, :] == t[:, None]).to(torch.int8).argmax(dim=1)
        else:
            at = self.step_index if self.step_index is not None else self.begin_index
            idx = torch.full(t.shape, at, dtype=torch.long, device=device)
        return self._fd_alpha_sigma(sig[idx])

    def _fd_alpha_sigma(self, s):
        if self._fd_flow():
            return 1.0 - s, s
        a = 1.0 / torch.sqrt(1.0 + s * s)
        return a, s * a


class _EulerFamily(_SigmaScheduler):
    """Samples in y = x / alpha (k-diffusion's space): scale_model_input multiplies by alpha, the rows are folded;
    step's output has pred_original_sample."""

    _scales_input = True
    _returns_x0 = True

    def _fd_fold(self, begin):
        sig = self._fd_sigmas(begin)  # stage k reads sigmas[k] and lands on sigmas[k + 1] (Heun's repeat too)
        a = 1.0 / np.sqrt(1.0 + sig * sig)
        return {"a_in": a[:-1], "a_out": a[1:]}

    def _fd_alpha_sigma(self, s):
        return torch.ones_like(s), s  # add_noise in y: x0 + sigma noise


class _OneStepEuler(_EulerFamily):
    """Euler-type steps without history: each step is a plan of its own, so step runs on diffusers' training
    schedule right after __init__ too."""

    _stateful = False
    _one_step = True
    _ready_at_init = True


class EulerDiscreteScheduler(_OneStepEuler, _d.EulerDiscreteScheduler):
    """diffusers' Euler (Karras et al. 2022, Algorithm 1 in y) on fastdiff's ``euler`` rows."""

    _output = "scheduling_euler_discrete.EulerDiscreteSchedulerOutput"

    def _fd_solver(self, begin, eta=None):
        return "euler", {}

    def step(self, model_output, timestep, sample, s_churn: float = 0.0, s_tmin: float = 0.0,
             s_tmax: float = float("inf"), s_noise: float = 1.0, generator=None, return_dict: bool = True, *,
             seeds=None, step_index=None, state=None):
        if s_churn != 0.0:
            _unsupported("EulerDiscreteScheduler.step(s_churn > 0) (diffusers applies the model output of sigma "
                         "at sigma_hat); fastdiff's euler / heun plans take s_churn with Karras' Algorithm 2")
        return self._fd_step(model_output, timestep, sample, generator=generator, seeds=seeds,
                             step_index=step_index, state=state, return_dict=return_dict)


class EulerAncestralDiscreteScheduler(_OneStepEuler, _d.EulerAncestralDiscreteScheduler):
    """diffusers' Euler ancestral on fastdiff's ``euler_ancestral`` rows (eta = 1)."""

    _output = "scheduling_euler_ancestral_discrete.EulerAncestralDiscreteSchedulerOutput"

    def _fd_solver(self, begin, eta=None):
        return "euler_ancestral", {"eta": 1.0}

    def _fd_peer_draws(self, n):
        return [True] * n

    def step(self, model_output, timestep, sample, generator=None, return_dict: bool = True, *, seeds=None,
             step_index=None, state=None):
        return self._fd_step(model_output, timestep, sample, generator=generator, seeds=seeds,
                             step_index=step_index, state=state, return_dict=return_dict)


class HeunDiscreteScheduler(_EulerFamily, _d.HeunDiscreteScheduler):
    """diffusers' Heun (Karras et al. 2022, Algorithm 1) on fastdiff's ``heun`` rows; its timesteps repeat (two
    model calls per step), so per-sample steps take ``step_index=``."""

    _output = "scheduling_heun_discrete.HeunDiscreteSchedulerOutput"

    def _fd_grid(self, begin):
        if begin % 2:
            raise ValueError("HeunDiscreteScheduler: begin_index must be even (the first call of a step)")
        sig = self._fd_sigmas(begin)  # [s0, s1, s1, ..., s_{n-1}, s_{n-1}, 0]
        return np.concatenate([sig[0:-1:2], sig[-1:]])

    def _fd_solver(self, begin, eta=None):
        return "heun", {}

    def step(self, model_output, timestep, sample, return_dict: bool = True, *, seeds=None, step_index=None,
             state=None):
        return self._fd_step(model_output, timestep, sample, seeds=seeds, step_index=step_index, state=state,
                             return_dict=return_dict)


class DPMSolverMultistepScheduler(_SigmaScheduler, _d.DPMSolverMultistepScheduler):
    """diffusers' DPM-Solver++ multistep (orders 1-3, midpoint / heun, ODE and SDE) on fastdiff's dpmpp rows."""

    _unknown_timestep_is_last = True
    _noise_fp32 = True

    def _fd_check_config(self):
        c = self.config
        if c.algorithm_type == "sde-dpmsolver" and c.solver_order == 3:
            _unsupported("algorithm_type='sde-dpmsolver' with solver_order=3 (diffusers has no such update)")

    def _fd_solver(self, begin, eta=None):
        c = self.config
        opts = {"solver_type": c.solver_type, "lower_order_final": bool(c.lower_order_final),
                "euler_at_final": bool(c.euler_at_final)}
        if c.algorithm_type in ("dpmsolver", "sde-dpmsolver"):  # noise prediction
            return "dpm_solver_multistep", dict(opts, order=int(c.solver_order), algorithm=c.algorithm_type)
        if c.solver_order == 1:  # the first-order update of dpmsolver++ / sde-dpmsolver++
            return "dpm_solver_singlestep", {"order": 1, "algorithm": c.algorithm_type}
        sde = c.algorithm_type == "sde-dpmsolver++"
        if sde:
            opts["eta"] = 1.0
        return {(2, False): "dpmpp_2m", (3, False): "dpmpp_3m", (2, True): "dpmpp_2m_sde",
                (3, True): "dpmpp_3m_sde"}[(int(c.solver_order), sde)], opts

    def _fd_peer_draws(self, n):
        return [self.config.algorithm_type.startswith("sde")] * n

    def step(self, model_output, timestep, sample, generator=None, variance_noise=None, return_dict: bool = True,
             *, seeds=None, step_index=None, state=None):
        model_output = _mean_part(self.config, model_output)
        return self._fd_step(model_output, timestep, sample, generator=generator, variance_noise=variance_noise,
                             seeds=seeds, step_index=step_index, state=state, return_dict=return_dict)


class DPMSolverSinglestepScheduler(_SigmaScheduler, _d.DPMSolverSinglestepScheduler):
    """diffusers' singlestep DPM-Solver(++) on fastdiff's ``dpm_solver_singlestep`` rows with diffusers' order list."""

    _unknown_timestep_is_last = True

    def _fd_solver(self, begin, eta=None):
        c = self.config
        sub = [int(o) for o in self.order_list][begin:]
        orders = tuple(min(o, j + 1) for j, o in enumerate(sub))  # diffusers lowers the first orders of a late start
        return "dpm_solver_singlestep", {"order": int(c.solver_order), "algorithm": c.algorithm_type,
                                         "solver_type": c.solver_type, "orders": orders}

    def _fd_peer_draws(self, n):
        return [self.config.algorithm_type == "sde-dpmsolver++"] * n

    def step(self, model_output, timestep, sample, generator=None, return_dict: bool = True, *, seeds=None,
             step_index=None, state=None):
        model_output = _mean_part(self.config, model_output)
        return self._fd_step(model_output, timestep, sample, generator=generator, seeds=seeds,
                             step_index=step_index, state=state, return_dict=return_dict)


class UniPCMultistepScheduler(_SigmaScheduler, _d.UniPCMultistepScheduler):
    """diffusers' UniPC (data prediction, bh1 / bh2, orders 1-3, corrector) on fastdiff's ``unipc`` rows."""

    _unknown_timestep_is_last = True

    def _fd_check_config(self):
        c = self.config
        if not c.predict_x0:
            _unsupported("predict_x0=False (UniPC with noise prediction)")
        if c.solver_p is not None:
            _unsupported("solver_p (an external predictor)")

    def _fd_solver(self, begin, eta=None):
        c = self.config
        disabled = tuple(int(s) - begin for s in (c.disable_corrector or []) if int(s) >= begin)
        return "unipc", {"order": int(c.solver_order), "solver_type": c.solver_type,
                         "lower_order_final": bool(c.lower_order_final), "disable_corrector": disabled}

    def step(self, model_output, timestep, sample, return_dict: bool = True, *, seeds=None, step_index=None,
             state=None):
        return self._fd_step(model_output, timestep, sample, seeds=seeds, step_index=step_index, state=state,
                             return_dict=return_dict)


