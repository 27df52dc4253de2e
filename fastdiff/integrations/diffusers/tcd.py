"""diffusers' TCDScheduler (Trajectory Consistency Distillation's strategic stochastic sampling)."""

from __future__ import annotations

import math

import numpy as np

from ...plan import plan as make_plan
from ._base import PREDICTION, _d, _FastdiffStep, _Program, _stagewise, data_estimate


class TCDScheduler(_FastdiffStep, _d.TCDScheduler):
    """diffusers' TCD (``eta`` = the paper's gamma, per ``step`` call) on fastdiff's ``tcd`` rows over diffusers'
    timesteps and a last step to timestep 0; returns ``pred_noised_sample`` (x_s) too.  diffusers' TCD step
    ignores ``clip_sample`` / ``thresholding``, and so does this one."""

    _output = "scheduling_tcd.TCDSchedulerOutput"

    def _fd_build(self, begin, eta):
        ts = self._fd_ts_host
        sched, pred = self._fd_schedule(), PREDICTION[self.config.prediction_type]
        bounds = list(ts) + [0.0]  # diffusers' last step goes to timestep 0 (alpha_bar[0]), not the clean point
        opts = dict(gamma=eta, float32_floor=True)
        try:
            p = make_plan("tcd", sched, prediction=pred, boundaries=bounds, **opts)
            rows, flags, draws, refused = p.shared_rows(), p.stage_flags, p.draw, {}
        except ValueError:  # a step the plan refuses (timestep 0 last, alpha_bar = 0): one plan per step
            rows, flags, draws, refused = _stagewise(
                lambda k: make_plan("tcd", sched, prediction=pred, boundaries=bounds[k:k + 2], **opts), len(ts))
        # x_s = alpha_s D + sigma_s eps = (sigma_s / sigma_t) x + (alpha_s - sigma_s alpha_t / sigma_t) D
        xs_x, xs_D = [], []
        for k, t in enumerate(ts):
            t_next = bounds[k + 1]
            t_s = math.floor(float(np.float32(1.0 - eta) * np.float32(t_next)))  # diffusers' float32 product
            a_t, s_t = float(sched.alpha(t)), float(sched.sigma(t))
            a_s, s_s = float(sched.alpha(t_s)), float(sched.sigma(t_s))
            xs_x.append(s_s / s_t if s_t > 0 else 0.0)
            xs_D.append(a_s - s_s * a_t / s_t if s_t > 0 else a_s)
        peer = [eta > 0 and k != len(ts) - 1 for k in range(len(ts))]
        return _Program(rows, flags, draws, 0, ts, peer_draws=peer, refused=refused,
                        extra={"xs_x": xs_x, "xs_D": xs_D})

    def _fd_x0_transform(self):
        return None  # diffusers' TCD step does not clip or threshold

    def _fd_extra(self, prog, dev, k, B, x, model_output, x0):
        bshape = (-1,) + (1,) * (x.dim() - 1)
        rows = self._fd_gather(prog, dev, "rows", k, B)
        D = data_estimate(rows, x, model_output)
        a = self._fd_gather(prog, dev, "xs_x", k, B).reshape(bshape)
        c = self._fd_gather(prog, dev, "xs_D", k, B).reshape(bshape)
        return (a * x.to(D.dtype) + c * D).to(x.dtype)

    def _fd_output(self, prev, x_s):
        return _d.schedulers.scheduling_tcd.TCDSchedulerOutput(prev_sample=prev, pred_noised_sample=x_s)

    def _fd_tuple(self, prev, x_s):
        return (prev, x_s)

    def step(self, model_output, timestep, sample, eta: float = 0.3, generator=None, return_dict: bool = True, *,
             seeds=None, step_index=None, state=None):
        """diffusers' TCD step; with eta > 0 and no ``generator`` the noise is fastdiff's Philox draw of ``seeds``."""
        eta = float(eta)
        if not 0.0 <= eta <= 1.0:
            raise ValueError(f"eta (TCD's gamma) must be in [0, 1], got {eta}")
        return self._fd_step(model_output, timestep, sample, generator=generator, seeds=seeds,
                             step_index=step_index, state=state, return_dict=return_dict, eta=eta)
