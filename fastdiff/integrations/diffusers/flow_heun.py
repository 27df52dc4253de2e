"""Flow matching with Heun's method: diffusers' FlowMatchHeunDiscreteScheduler on a rectified flow."""

from __future__ import annotations

import numpy as np
import torch

from ...plan import plan as make_plan
from ...schedules import RectifiedFlow
from ._base import _d, _Program, _unsupported
from .sigma_indexed import _SigmaScheduler


class FlowMatchHeunDiscreteScheduler(_SigmaScheduler, _d.FlowMatchHeunDiscreteScheduler):
    """diffusers' flow-matching Heun (shift) on fastdiff's ``flow_heun`` rows on a rectified flow
    x_t = (1 - t) x0 + t noise, t = diffusers' sigma.  Its timesteps repeat (two model calls per step, one on the
    last step to sigma 0), so per-sample steps take ``step_index=``; a run starts on a step's first call (an even
    begin index)."""

    _output = "scheduling_flow_match_heun_discrete.FlowMatchHeunDiscreteSchedulerOutput"

    def _fd_build(self, begin, eta):
        if begin % 2:
            raise ValueError("FlowMatchHeunDiscreteScheduler: begin_index must be even (the first call of a step)")
        sig = self._fd_sig_host[begin:]  # [s0, s1, s1, ..., s_{n-1}, s_{n-1}, 0]
        grid = np.concatenate([sig[0:-1:2], sig[-1:]])
        flow = RectifiedFlow(t_min=min(1e-3, float(sig[sig > 0].min())), t_max=max(1.0, float(sig.max())))
        p = make_plan("flow_heun", flow, prediction="flow", boundaries=list(grid))
        ts = self._fd_ts_host[begin:]
        if p.num_stages != len(ts):  # pragma: no cover - one row per diffusers call
            raise AssertionError(f"flow_heun plan has {p.num_stages} stages for {len(ts)} timesteps")
        return _Program(p.shared_rows(), p.stage_flags, p.draw, p.num_slots, ts)

    def _fd_alpha_sigma(self, s):
        return 1.0 - s, s

    def step(self, model_output, timestep, sample, s_churn: float = 0.0, s_tmin: float = 0.0,
             s_tmax: float = float("inf"), s_noise: float = 1.0, generator=None, return_dict: bool = True, *,
             seeds=None, step_index=None, state=None):
        if isinstance(timestep, int) or (isinstance(timestep, torch.Tensor) and not timestep.is_floating_point()):
            raise ValueError("Passing integer indices (e.g. from `enumerate(timesteps)`) as timesteps to "
                             "`FlowMatchHeunDiscreteScheduler.step()` is not supported. Make sure to pass one of "
                             "the `scheduler.timesteps` as a timestep.")
        if s_churn != 0.0:
            _unsupported("FlowMatchHeunDiscreteScheduler.step(s_churn > 0)")
        return self._fd_step(model_output, timestep, sample, seeds=seeds, step_index=step_index, state=state,
                             return_dict=return_dict)
