"""diffusers' EDM schedulers (Karras et al. 2022): the sample is x itself (alpha = 1, sigma = diffusers' sigma, the
schedule ``fastdiff.schedules.EDM``) and the model output is the raw network F of EDM's preconditioning,
D = c_skip x + c_out F.  The plan's rows (of the configured prediction on that schedule) get their data-estimate
columns set to (c_skip, c_out) of their sigma, so the kernel still forms D in its one pass; ``scale_model_input``
multiplies by c_in = 1 / sqrt(sigma^2 + sigma_data^2)."""

from __future__ import annotations

import numpy as np
import torch

from ...plan import x0_input_rows
from ...schedules import EDM
from ._base import CO, CX, _d, _unsupported
from .sigma_indexed import DPMSolverMultistepScheduler, _SigmaScheduler


class _EDMScheduler(_SigmaScheduler):
    _scales_input = True
    _ready_at_init = True  # diffusers' __init__ sets the training sigmas: scale_model_input runs on them

    def _fd_schedule(self):
        sig = self._fd_sig_host
        pos = sig[sig > 0]
        c = self.config
        return EDM(sigma_min=min(float(c.sigma_min), float(pos.min())), sigma_max=max(float(c.sigma_max),
                   float(pos.max())), sigma_data=float(c.sigma_data))

    def _fd_grid(self, begin):
        grid = np.array(super()._fd_grid(begin))
        if len(grid) > 1 and grid[-1] > grid[-2] > 0:
            # final_sigmas_type="sigma_min": Karras sigmas rounded to float32 can end just below sigma_min, so
            # diffusers' last step rises by a relative ~1e-7; it runs here as the step that keeps sigma
            grid[-1] = grid[-2]
        return grid

    def _fd_preconditioning(self, s):
        """(c_skip, c_out, c_in) [n] at sigmas ``s`` (diffusers' precondition_outputs / _get_conditioning_c_in)."""
        sd = float(self.config.sigma_data)
        if self.config.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"{type(self).__name__}: prediction_type {self.config.prediction_type!r} is not "
                             "supported (EDM preconditioning takes 'epsilon' or 'v_prediction')")
        norm = np.sqrt(s * s + sd * sd)
        c_out = s * sd / norm
        return sd * sd / (norm * norm), -c_out if self.config.prediction_type == "v_prediction" else c_out, 1.0 / norm

    def _fd_build(self, begin, eta):
        c_skip, c_out, c_in = self._fd_preconditioning(self._fd_sigmas(begin)[: len(self._fd_ts_host) - begin])
        prog = super()._fd_build(begin, eta)
        # the program is new and not yet on a device: the data-estimate columns of its host rows (whatever the
        # prediction the plan converted) become EDM's preconditioning, or those of an x0 prediction where step was
        # given pred_original_sample (eta "x0"); nothing else in a row depends on the prediction
        prog.rows64[:, CX], prog.rows64[:, CO] = (0.0, 1.0) if eta == "x0" else (c_skip, c_out)
        prog.x0_rows64 = x0_input_rows(prog.rows64)
        prog.in_scale = c_in
        return prog

    def _fd_alpha_sigma(self, s):
        return torch.ones_like(s), s  # add_noise: x0 + sigma noise


class EDMEulerScheduler(_EDMScheduler, _d.EDMEulerScheduler):
    """diffusers' EDM Euler (Karras et al. 2022, Algorithm 1 without churn) on fastdiff's ``euler`` rows."""

    _output = "scheduling_edm_euler.EDMEulerSchedulerOutput"
    _returns_x0 = True

    def _fd_solver(self, begin, eta=None):
        return "euler", {}

    def step(self, model_output, timestep, sample, s_churn: float = 0.0, s_tmin: float = 0.0,
             s_tmax: float = float("inf"), s_noise: float = 1.0, generator=None, return_dict: bool = True,
             pred_original_sample=None, *, seeds=None, step_index=None, state=None):
        if isinstance(timestep, (int, torch.IntTensor, torch.LongTensor)):
            raise ValueError("Passing integer indices (e.g. from `enumerate(timesteps)`) as timesteps to "
                             "`EDMEulerScheduler.step()` is not supported. Make sure to pass one of the "
                             "`scheduler.timesteps` as a timestep.")
        if s_churn != 0.0:
            _unsupported("EDMEulerScheduler.step(s_churn > 0) (diffusers applies the model output of sigma at "
                         "sigma_hat); fastdiff's euler / heun plans take s_churn with Karras' Algorithm 2")
        if pred_original_sample is not None:  # the x0 rows take it as the model output
            model_output, eta = pred_original_sample, "x0"
        else:
            eta = None
        return self._fd_step(model_output, timestep, sample, seeds=seeds, step_index=step_index, state=state,
                             return_dict=return_dict, eta=eta)


class EDMDPMSolverMultistepScheduler(_EDMScheduler, _d.EDMDPMSolverMultistepScheduler):
    """diffusers' EDM DPM-Solver++ multistep (orders 1-3, midpoint / heun, ODE and SDE up to order 2) on fastdiff's
    dpmpp rows on the EDM schedule."""

    _unknown_timestep_is_last = True
    _fd_solver = DPMSolverMultistepScheduler._fd_solver

    def _fd_check_config(self):
        c = self.config
        if c.algorithm_type == "sde-dpmsolver++" and c.solver_order == 3:
            _unsupported("algorithm_type='sde-dpmsolver++' with solver_order=3 (diffusers has no such update)")

    def _fd_peer_draws(self, n):
        return [self.config.algorithm_type == "sde-dpmsolver++"] * n

    def step(self, model_output, timestep, sample, generator=None, return_dict: bool = True, *, seeds=None,
             step_index=None, state=None):
        if self.num_inference_steps is None:
            raise ValueError("Number of inference steps is 'None', you need to run 'set_timesteps' after creating "
                             "the scheduler")
        return self._fd_step(model_output, timestep, sample, generator=generator, seeds=seeds,
                             step_index=step_index, state=state, return_dict=return_dict)
