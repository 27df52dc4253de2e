"""Flow matching: diffusers' FlowMatchEulerDiscreteScheduler on a rectified flow."""

from __future__ import annotations

import numpy as np

from ...plan import StageFlags, identity_row
from ...plan import plan as make_plan
from ...schedules import RectifiedFlow
from ._base import _d, _Program, _unsupported
from .sigma_indexed import _SigmaScheduler


class FlowMatchEulerDiscreteScheduler(_SigmaScheduler, _d.FlowMatchEulerDiscreteScheduler):
    """diffusers' flow-matching Euler (shift, dynamic shifting, Karras / exponential / beta sigmas) on fastdiff's
    ``flow_euler`` rows on a rectified flow x_t = (1 - t) x0 + t noise, t = diffusers' sigma."""

    _stateful = False
    _output = "scheduling_flow_match_euler_discrete.FlowMatchEulerDiscreteSchedulerOutput"

    def _fd_check_config(self):
        c = self.config
        for name in ("stochastic_sampling", "invert_sigmas"):
            if getattr(c, name, False):
                _unsupported(f"{name}=True")

    def _fd_build(self, begin, eta):
        sig = self._fd_sig_host
        # t_min below diffusers' smallest sigma (shifted or Karras sigmas go below 1 / num_train_timesteps)
        flow = RectifiedFlow(t_min=min(1e-3, float(sig[sig > 0].min())), t_max=max(1.0, float(sig.max())))
        # a sigma repeated in the user's sigmas= is a step of length 0 (diffusers leaves x as is): the plan's grid
        # is strictly decreasing, so it skips them and those calls get an identity row
        still = np.flatnonzero(sig[1:] == sig[:-1])
        p = make_plan("flow_euler", flow, prediction="flow", boundaries=list(np.delete(sig, still + 1)))
        rows, flags, draws = list(p.shared_rows()), list(p.stage_flags), list(p.draw)
        for k in still:
            rows.insert(k, identity_row(0))
            flags.insert(k, StageFlags(0, 0, False, False, False))
            draws.insert(k, -1)
        return _Program(rows, flags, draws, 0, self._fd_ts_host)

    def step(self, model_output, timestep, sample, s_churn: float = 0.0, s_tmin: float = 0.0,
             s_tmax: float = float("inf"), s_noise: float = 1.0, generator=None, per_token_timesteps=None,
             return_dict: bool = True, *, seeds=None, step_index=None, state=None):
        if per_token_timesteps is not None:
            _unsupported("per_token_timesteps")
        return self._fd_step(model_output, timestep, sample, seeds=seeds, step_index=step_index, state=state,
                             return_dict=return_dict)

    def _fd_alpha_sigma(self, s):
        return 1.0 - s, s

    def scale_noise(self, sample, timestep, noise=None):
        """x_t = (1 - sigma) x0 + sigma noise at the sigmas of ``timestep`` (per sample, on the device)."""
        return self.add_noise(sample, noise, timestep)
