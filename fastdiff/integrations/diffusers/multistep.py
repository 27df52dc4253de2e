"""Multistep schedulers on diffusers' noise levels: DEIS (log-rho), iPNDM, PNDM / PLMS."""

from __future__ import annotations

from ._base import _d, _unsupported
from .sigma_indexed import _SigmaScheduler


class DEISMultistepScheduler(_SigmaScheduler, _d.DEISMultistepScheduler):
    """diffusers' DEIS multistep (log-rho, orders 1-3, every sigma option) on fastdiff's ``deis_logrho`` rows."""

    _unknown_timestep_is_last = True

    def _fd_check_config(self):
        c = self.config
        if c.algorithm_type != "deis" or c.solver_type != "logrho":
            _unsupported(f"algorithm_type={c.algorithm_type!r} / solver_type={c.solver_type!r} (diffusers itself "
                         "only steps 'deis' / 'logrho')")

    def _fd_solver(self, begin):
        c = self.config
        # diffusers lowers the last two orders when its whole schedule has fewer than 15 steps
        cool_down = bool(c.lower_order_final) and len(self._fd_ts_host) < 15
        return "deis_logrho", {"order": int(c.solver_order), "lower_order_final": cool_down}

    def step(self, model_output, timestep, sample, return_dict: bool = True, *, seeds=None, step_index=None,
             state=None):
        return self._fd_step(model_output, timestep, sample, seeds=seeds, step_index=step_index, state=state,
                             return_dict=return_dict)
