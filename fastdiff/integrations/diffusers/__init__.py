"""diffusers drop-in schedulers whose ``step`` is a fastdiff plan row in the fused step kernel.

Each class subclasses the diffusers scheduler of the same name, so configuration (``from_config``, ``save_config``,
``config``), ``set_timesteps`` (timesteps and noise levels exactly as diffusers computes them, every spacing and
sigma option included), ``init_noise_sigma``, ``order`` and the output classes are diffusers' own and pipelines
accept the scheduler unchanged.  What is replaced is the arithmetic:

- ``set_timesteps`` compiles diffusers' noise levels into a fastdiff ``Plan`` (the solver math lives in
  ``fastdiff.solvers``, once) and moves its coefficient rows to the device;
- ``step`` executes one row with ``fastdiff.ops.step``: one memory pass, coefficients read from device memory, no
  host sync (usable inside CUDA-graph capture), per-sample timesteps in one call (``timestep`` a [B] tensor, or
  ``step_index=`` a [B] tensor), Philox noise per sample (``seeds=``) unless a ``generator`` or ``variance_noise``
  is given, in which case the noise is drawn exactly as diffusers draws it;
- ``scale_model_input`` and ``add_noise`` / ``scale_noise`` gather their factors on the device.

Stateless use (threads): ``state = scheduler.new_state()`` after ``set_timesteps``; ``step(..., state=state)`` then
reads and writes only ``state`` (its counter and history), never the scheduler, so one scheduler serves many
concurrent sampling runs.

Euler-type schedulers (Euler, Euler ancestral, Heun) work on diffusers' ``x / alpha``; the rows fold that scaling
in (``_Program``), so the kernel still makes one pass.  Clipping and Imagen thresholding of the predicted x0
(``clip_sample``, ``thresholding``) need the x0 of the whole sample first: that path computes it with torch ops
and hands it to the kernel as the model output of an x0-row.  Where diffusers' output carries
``pred_original_sample`` (DDIM, DDPM, Euler, Euler ancestral, Heun), it is formed with torch ops too: one more pass.

The step is found as diffusers finds it: from its counter (set from ``set_begin_index`` or the first timestep,
the second occurrence of a repeated one) or from the timestep's value; DDIM steps from any timestep t to
t - num_train_timesteps // num_inference_steps, the multistep solvers take a timestep off the schedule as the last
step, and DDPM, Euler and Euler ancestral step on the training schedule before ``set_timesteps``.

Differences to diffusers, each a diffusers bug that fastdiff does not copy (pinned in the tests): DDPM with
``variance_type="fixed_large"`` adds noise on its final step; DPM-Solver++ SDE order 3 has a sign error in its D2
coefficient; UniPC bh1 returns NaN with ``final_sigmas_type="zero"``; a timestep that rounding repeats (DPM-Solver's
``set_timesteps(1000)``) is a step of length 0, after which diffusers divides by zero (NaN) and fastdiff leaves x
as is.  Coefficients are float64 (diffusers' float32 ``1 - alpha_bar`` loses digits near t = 0).  A step where a
noise prediction has no data estimate (alpha_bar <= 0: betas above 1) raises ``ValueError`` where diffusers returns
inf / NaN.  Options fastdiff does not implement raise ``NotImplementedError`` naming the option.

k-diffusion's samplers as diffusers ships them (``karras.py``): LMS, KDPM2, KDPM2 ancestral and DPMSolverSDE work in
y = x / alpha like the Euler family.  LMS after ``set_begin_index`` takes its Lagrange nodes from before the start
as diffusers does (the ``lms`` option ``past_sigmas``).  KDPM2, KDPM2 ancestral and DPMSolverSDE take two calls per
step (diffusers interleaves the intermediate timesteps), so a late start must begin on a step's first call (an even
``begin_index``; an odd one raises ``ValueError``); their ``prediction_type="sample"``, which diffusers does not
implement, works.  DPMSolverSDE's Brownian tree: without ``noise_sampler_seed`` the two noises of a step are Philox
draws with the tree's joint law (the same law, other numbers than torchsde's); with it (torchsde installed) a run on
the scheduler's own counter takes diffusers' tree draws and reproduces diffusers' numbers.

EDM (``edm.py``): EDMEuler and EDM DPM-Solver multistep run on ``fastdiff.schedules.EDM`` in x itself, the rows'
data-estimate columns set to EDM's preconditioning (c_skip, c_out); ``scale_model_input`` multiplies by c_in.
Refused: ``EDMEulerScheduler.step(s_churn > 0)`` (diffusers applies the model output of sigma at the churned
sigma_hat, as in EulerDiscrete) and ``algorithm_type="sde-dpmsolver++"`` with ``solver_order=3`` (diffusers has no
such update: its step fails).  With ``final_sigmas_type="sigma_min"`` the float32 Karras sigmas can end just below
sigma_min, so diffusers' last step rises by a relative 2e-7 (its heun order-2 update then divides by a float32 step
of 0: NaN); fastdiff takes it as a step that keeps sigma.

DEIS runs fastdiff's ``deis_logrho`` rows, TCD ``tcd`` (with ``float32_floor``: diffusers forms (1 - gamma) t' in
float32 before the floor), FlowMatchHeun ``flow_heun``.  iPNDM, PNDM and SA-Solver are rows written in diffusers'
own arithmetic over x, the model output and history slots (``multistep.py``), because their steps depend on more
than the grid: iPNDM's order is diffusers' count of calls since ``set_timesteps`` (a second loop after resetting the
step index continues the history), PNDM's calls follow its counter (``step_prk`` / ``step_plms`` with another
timestep get a row of their own), SA-Solver's corrector re-uses the previous step's noise, which the rows keep in
x: the corrected sample is x + (corrector gradient - previous predictor gradient), exact when ``sample`` is the
previous call's ``prev_sample``, as in every sampling loop.  Their history lives in the slots, so assigning
``scheduler.ets`` (diffusers' list) does not feed the rows; PNDM's ``step_plms`` guard still reads it.  Refused on
purpose: noise from torch's global RNG when no ``generator`` is given (fastdiff draws Philox per sample, ``seeds=``;
diffusers' SA-Solver full-loop tests seed the global RNG and fail for that reason), ``s_churn > 0`` for
FlowMatchHeun.  Like diffusers, TCD's step neither clips nor thresholds.
"""

from __future__ import annotations

from ._base import StepState
from .edm import EDMDPMSolverMultistepScheduler, EDMEulerScheduler
from .flow import FlowMatchEulerDiscreteScheduler
from .flow_heun import FlowMatchHeunDiscreteScheduler
from .karras import (DPMSolverSDEScheduler, KDPM2AncestralDiscreteScheduler, KDPM2DiscreteScheduler,
                     LMSDiscreteScheduler)
from .multistep import DEISMultistepScheduler, IPNDMScheduler, PNDMScheduler, SASolverScheduler
from .sigma_indexed import (DPMSolverMultistepScheduler, DPMSolverSinglestepScheduler, EulerAncestralDiscreteScheduler,
                            EulerDiscreteScheduler, HeunDiscreteScheduler, UniPCMultistepScheduler)
from .tcd import TCDScheduler
from .timestep_indexed import DDIMScheduler, DDPMScheduler, LCMScheduler

__all__ = ["DDIMScheduler", "DDPMScheduler", "DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler",
           "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler", "HeunDiscreteScheduler",
           "UniPCMultistepScheduler", "FlowMatchEulerDiscreteScheduler", "LCMScheduler", "LMSDiscreteScheduler",
           "KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler", "DPMSolverSDEScheduler", "EDMEulerScheduler",
           "EDMDPMSolverMultistepScheduler", "DEISMultistepScheduler", "IPNDMScheduler", "TCDScheduler",
           "FlowMatchHeunDiscreteScheduler", "PNDMScheduler", "SASolverScheduler",
           "StepState"]  # StepState last: the tests take the schedulers as __all__[:-1]
