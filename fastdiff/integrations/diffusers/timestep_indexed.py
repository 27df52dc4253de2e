"""Timestep-indexed VP schedulers: DDIM, DDPM, LCM (diffusers finds the step from the timestep's value)."""

from __future__ import annotations

import math

import numpy as np
import torch

from ...plan import StageFlags, identity_row
from ...plan import plan as make_plan
from ._base import (CO, CX, _REFUSED_FLAGS, _REFUSED_ROW, PREDICTION, _d, _FastdiffStep, _numbered_draws, _Program,
                    _stagewise, _unsupported, data_estimate)


class _OneStepStages(_FastdiffStep):
    """Schedulers whose steps each go from one timestep to the next (no history): DDPM and LCM."""

    _index_by = "timestep"

    def _fd_stages(self, solver, **opts):
        """(rows, flags, draws, refused) of ``solver`` over diffusers' timesteps and the clean point: one plan, or
        where that plan is refused, one plan per step with the refused ones as NaN rows."""
        sched, pred = self._fd_schedule(), PREDICTION[self.config.prediction_type]
        bounds = list(self._fd_ts_host) + [-1.0]
        try:
            p = make_plan(solver, sched, prediction=pred, boundaries=bounds, **opts)
            return p.shared_rows(), p.stage_flags, p.draw, {}
        except ValueError:
            return _stagewise(lambda k: make_plan(solver, sched, prediction=pred, boundaries=bounds[k : k + 2], **opts),
                              len(bounds) - 1)


class DDIMScheduler(_FastdiffStep, _d.DDIMScheduler):
    """diffusers' DDIM (eta via ``step(eta=...)``) on fastdiff's ``ddim`` rows; each step goes from t to
    t - num_train_timesteps // num_inference_steps, as diffusers' does."""

    _index_by = "timestep"

    _returns_x0 = True
    _output = "scheduling_ddim.DDIMSchedulerOutput"

    def _fd_stage(self, t: float, eta: float):
        """(row, flags, alpha') of diffusers' step from t to t - num_train_timesteps // num_inference_steps (below 0:
        the final alpha_bar, 1 or alpha_bar[0] by set_alpha_to_one); alpha' = sqrt(alpha_bar) at the end."""
        sched = self._fd_schedule()
        pred = PREDICTION[self.config.prediction_type]
        stride = self.config.num_train_timesteps // self.num_inference_steps
        end = -1.0 if self.config.set_alpha_to_one else 0.0
        prev = t - stride if t - stride >= 0 else end
        alpha_next = 1.0 if prev == -1.0 else math.sqrt(float(sched.alphas_cumprod[int(prev)]))
        if prev < t:
            p = make_plan("ddim", sched, prediction=pred, boundaries=[t, prev], eta=eta)
            return p.shared_rows()[0], p.stage_flags[0], alpha_next
        # t = 0 ending on alpha_bar[0]: diffusers' step to the same alpha_bar keeps x, but a clipped x0 still moves
        # it (raw-eps term) and is returned: keep D's conversion at t, x' = x
        row = identity_row(0)
        row[[CX, CO]] = make_plan("ddim", sched, prediction=pred, boundaries=[t, -1.0]).data_coefs[0]
        return row, StageFlags(0, 0, True, False, False), alpha_next

    def _fd_build(self, begin, eta):
        ts = self._fd_ts_host
        rows, flags, alpha_next, refused = [], [], [], {}
        for k, t in enumerate(ts):
            try:
                row, f, a = self._fd_stage(float(t), eta)
            except ValueError as e:
                row, f, a = _REFUSED_ROW, _REFUSED_FLAGS, np.nan
                refused[k] = str(e)
            rows.append(row)
            flags.append(f)
            alpha_next.append(a)
        return _Program(rows, flags, _numbered_draws(flags), 0, ts, peer_draws=[eta > 0] * len(ts),
                        alpha_next=alpha_next, refused=refused)

    def _fd_off_schedule(self, timestep, eta):
        """diffusers steps from any timestep t to t - stride: a one-stage program per such t."""
        t = float(timestep.reshape(-1)[0].item() if hasattr(timestep, "reshape") else timestep)
        key = ("off schedule", t, eta)
        prog = self._fd_programs.get(key)
        if prog is None:
            row, flags, alpha_next = self._fd_stage(t, eta)
            prog = self._fd_programs[key] = _Program([row], [flags], [1 if flags.noise else -1], 0, [t],
                                                     peer_draws=[eta > 0], alpha_next=[alpha_next])
        return prog, 0

    def step(self, model_output, timestep, sample, eta: float = 0.0, use_clipped_model_output: bool = False,
             generator=None, variance_noise=None, return_dict: bool = True, *, seeds=None, step_index=None,
             state=None):
        """diffusers' DDIM step; with eta > 0 and neither ``generator`` nor ``variance_noise`` the noise is
        fastdiff's Philox draw of ``seeds`` ([B] ints, default 0..B-1); ``timestep`` may be a [B] tensor."""
        eta = float(eta)
        if not math.isfinite(eta) or eta < 0:
            raise ValueError(f"eta must be a finite number >= 0, got {eta}")
        return self._fd_step(model_output, timestep, sample, generator=generator, variance_noise=variance_noise,
                             seeds=seeds, step_index=step_index, state=state, return_dict=return_dict, eta=eta,
                             raw_eps=not use_clipped_model_output)


class DDPMScheduler(_OneStepStages, _d.DDPMScheduler):
    """diffusers' DDPM (variance_type fixed_small / fixed_large) on fastdiff's ``ddpm`` rows."""

    _returns_x0 = True
    _output = "scheduling_ddpm.DDPMSchedulerOutput"
    _ready_at_init = True

    def _fd_check_config(self):
        v = self.config.variance_type
        if v in ("learned", "learned_range"):
            _unsupported(f"variance_type={v!r} (a model that predicts its variance)")
        if v == "fixed_large_log":
            _unsupported("variance_type='fixed_large_log'")

    def _fd_build(self, begin, eta):
        ts = self._fd_ts_host
        variance = "fixed_large" if self.config.variance_type == "fixed_large" else "fixed_small"
        rows, flags, draws, refused = self._fd_stages("ddpm", variance=variance)
        return _Program(rows, flags, draws, 0, ts, peer_draws=ts > 0, refused=refused)

    def step(self, model_output, timestep, sample, generator=None, return_dict: bool = True, *, seeds=None,
             step_index=None, state=None):
        return self._fd_step(model_output, timestep, sample, generator=generator, seeds=seeds,
                             step_index=step_index, state=state, return_dict=return_dict)


class LCMScheduler(_OneStepStages, _d.LCMScheduler):
    """diffusers' LCM multistep consistency sampling on fastdiff's ``lcm`` rows; returns ``denoised`` too."""

    def _fd_build(self, begin, eta):
        from ...solvers.consistency import boundary_scalings

        ts = self._fd_ts_host
        scaling = float(self.config.timestep_scaling)
        rows, flags, draws, refused = self._fd_stages("lcm", timestep_scaling=scaling)
        c = np.array([boundary_scalings(float(t), scaling) for t in ts]).reshape(-1, 2)
        return _Program(rows, flags, draws, 0, ts, peer_draws=np.arange(len(ts)) != len(ts) - 1,
                        extra={"c_skip": c[:, 0], "c_out": c[:, 1]}, refused=refused)

    def step(self, model_output, timestep, sample, generator=None, return_dict: bool = True, *, seeds=None,
             step_index=None, state=None):
        return self._fd_step(model_output, timestep, sample, generator=generator, seeds=seeds,
                             step_index=step_index, state=state, return_dict=return_dict)

    def _fd_extra(self, prog, dev, k, B, x, model_output, x0):
        # denoised = c_skip x + c_out x0: what the LCM pipeline returns after its last step
        if type(k) is int and x.dtype is dev["rows"].dtype and model_output.dtype is x.dtype:
            # one step: its coefficients as host numbers rounded to the rows' dtype (as the device rows are), so
            # these torch ops round exactly as the gathered [1] columns below would, without the gathers
            st, rnd = dev["stages"][k], (np.float32 if x.dtype == torch.float32 else float)
            if x0 is None:
                x0 = x * st.cx + model_output * st.co
            return x * float(rnd(prog.extra["c_skip"][k])) + x0 * float(rnd(prog.extra["c_out"][k]))
        bshape = (-1,) + (1,) * (x.dim() - 1)
        rows = self._fd_gather(prog, dev, "rows", k, B)
        cdt = rows.dtype
        if x0 is None:
            x0 = data_estimate(rows, x, model_output)
        c_skip = self._fd_gather(prog, dev, "c_skip", k, B).reshape(bshape)
        c_out = self._fd_gather(prog, dev, "c_out", k, B).reshape(bshape)
        return (c_skip * x.to(cdt) + c_out * x0).to(x.dtype)

    def _fd_output(self, prev, denoised):
        return _d.schedulers.scheduling_lcm.LCMSchedulerOutput(prev_sample=prev, denoised=denoised)

    def _fd_tuple(self, prev, denoised):
        return (prev, denoised)


