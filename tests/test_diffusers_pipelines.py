"""fastdiff's drop-in schedulers inside real diffusers pipelines give the stock schedulers' outputs.

Each pipeline is built locally from tiny random-weight components (fixed torch seed, no hub access), the way
diffusers' own pipeline tests build them, and run twice with the same generator seed: once with diffusers' scheduler
and once with fastdiff's class of the same name made by ``from_config`` of the stock one's config.  The outputs must
agree to fp32 tolerance.  Compared are the final latents (``output_type="latent"``: exactly what the scheduler
produced; the VAE decode after it is the same deterministic function on both sides and its [0, 1] clamp would hide
differences) and, for DDPMPipeline, which has no VAE, the images.  The drop-in's ``step`` is counted, so a pipeline
that swapped the scheduler for a stock one (DDIMPipeline does: its ``__init__`` converts any scheduler to diffusers'
DDIMScheduler, so it is not used here) fails instead of comparing stock with stock.

Text encoders are never built: the text-conditioned pipelines get ``prompt_embeds`` (and the pooled / negative
embeddings) directly, with ``text_encoder`` / ``tokenizer`` = None.  diffusers still imports those pipeline modules
only when ``transformers`` is installed (they import the encoder classes at module level), so those tests skip
without it; the test extra installs it.
"""

from __future__ import annotations

import functools
import importlib.util

import pytest
import torch

from peers import FP32_RTOL, assert_close

diffusers = pytest.importorskip("diffusers")
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning", "ignore::DeprecationWarning")
import fastdiff.integrations.diffusers as fdd  # noqa: E402

needs_transformers = pytest.mark.skipif(
    importlib.util.find_spec("transformers") is None,
    reason="diffusers imports StableDiffusionPipeline / FluxPipeline / StableDiffusion3Pipeline only with "
           "transformers installed (pip install -e '.[test]' installs it)")

SD = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
# Stable Diffusion 2.x style: v-prediction, and with zero terminal SNR (the pipeline's guidance_rescale goes with it)
V = dict(SD, prediction_type="v_prediction")
ZERO_SNR = dict(V, rescale_betas_zero_snr=True, timestep_spacing="trailing")
# the scheduler configs of the released checkpoints (their scheduler_config.json)
SD3 = dict(num_train_timesteps=1000, shift=3.0)
FLUX = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
            base_image_seq_len=256, max_image_seq_len=4096)


def pipeline(name, **components):
    """diffusers' pipeline ``name`` built from ``components``, its progress bar off."""
    try:
        cls = getattr(diffusers, name)
    except RuntimeError as e:  # diffusers' lazy import of the pipeline module failed
        if "kernels" not in str(e):
            raise
        pytest.fail(f"{e}\ntransformers imports the package `kernels` when it is installed (transformers >= 5.25 "
                    "requires it), and the repository's own kernels/ folder shadows that name when pytest runs from "
                    "the repository root: pip install 'transformers<5.25' and pip uninstall kernels")
    pipe = cls(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny(build):
    """``build()`` under torch seed 0, without disturbing the global RNG of other tests."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return build().eval()


def count_steps(scheduler):
    """Wrap the instance's ``step`` to count its calls (signature kept: pipelines look for ``eta`` / ``generator``)."""
    calls = []
    inner = scheduler.step

    @functools.wraps(inner)
    def step(*args, **kwargs):
        calls.append(1)
        return inner(*args, **kwargs)

    scheduler.step = step
    return calls


def run_both(pipeline_name, components, name, config, **call):
    """The pipeline's output with diffusers' scheduler ``name`` and with fastdiff's made by ``from_config`` of its
    config: (ours, stock), as float32 tensors."""
    stock = getattr(diffusers, name)(**config)
    ours = getattr(fdd, name).from_config(stock.config)
    assert type(ours).__name__ == name and isinstance(ours, getattr(diffusers, name))
    calls = {id(s): count_steps(s) for s in (stock, ours)}
    outputs = []
    for scheduler in (stock, ours):
        pipe = pipeline(pipeline_name, scheduler=scheduler, **components)
        assert pipe.scheduler is scheduler
        with torch.no_grad():
            out = pipe(generator=torch.Generator().manual_seed(11), **call)
        outputs.append(torch.as_tensor(out.images).float())
    steps = len(calls[id(stock)])
    assert len(calls[id(ours)]) == steps > 0, f"{name}: the pipeline did not step the drop-in {steps} times"
    assert torch.equal(ours.timesteps, stock.timesteps)
    return outputs[1], outputs[0]


def start_image(size):
    """An img2img start image [2, 3, size, size] in [0, 1]."""
    return torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(8))


# ---------------------------------------------------------------------------------------------------------------
# DDPMPipeline (UNet2DModel, pixel space, no text): needs diffusers only
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ddpm_unet():
    return tiny(lambda: diffusers.UNet2DModel(
        sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8, 16),
        norm_num_groups=4, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D")))


@pytest.mark.parametrize("name,config,steps", [
    ("DDPMScheduler", dict(SD), 4),  # stochastic: the pipeline's generator drives diffusers' noise on both sides
    ("DDPMScheduler", dict(SD, timestep_spacing="trailing"), 3),
    ("DDIMScheduler", dict(SD), 4),
    ("DDIMScheduler", dict(SD, set_alpha_to_one=False), 3),
])
def test_ddpm_pipeline(ddpm_unet, name, config, steps):
    got, ref = run_both("DDPMPipeline", dict(unet=ddpm_unet), name, config, batch_size=2,
                        num_inference_steps=steps, output_type="np")
    assert ref.shape == (2, 8, 8, 3)
    # the images are clamped to [0, 1]: many pixels must lie inside, or the comparison would see only the clamp
    # (diffusers' default clip_sample=True keeps the random UNet's x0 in range)
    assert ((ref > 0) & (ref < 1)).float().mean() > 0.25
    assert_close(f"DDPMPipeline with {name} {config}", got, ref, FP32_RTOL)


# ---------------------------------------------------------------------------------------------------------------
# StableDiffusionPipeline (UNet2DConditionModel, classifier-free guidance on given prompt embeddings)
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sd_parts():
    """(components without the scheduler, prompt embeddings): latents [2, 4, 16, 16] for 32 x 32 images."""
    unet = tiny(lambda: diffusers.UNet2DConditionModel(
        block_out_channels=(4, 8), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, norm_num_groups=2))
    vae = tiny(lambda: diffusers.AutoencoderKL(
        block_out_channels=(4, 8), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=2,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D")))
    components = dict(vae=vae, unet=unet, text_encoder=None, tokenizer=None, safety_checker=None,
                      feature_extractor=None, image_encoder=None, requires_safety_checker=False)
    g = torch.Generator().manual_seed(5)
    embeds = dict(prompt_embeds=torch.randn(2, 7, 32, generator=g),
                  negative_prompt_embeds=torch.randn(2, 7, 32, generator=g))
    return components, embeds


SD_CASES = [
    ("DDIMScheduler", dict(SD, timestep_spacing="trailing"), dict(num_inference_steps=4)),
    ("DDIMScheduler", dict(SD), dict(num_inference_steps=3, eta=0.5)),  # eta > 0: generator noise
    ("DDIMScheduler", ZERO_SNR, dict(num_inference_steps=4, guidance_rescale=0.7)),
    ("DDPMScheduler", dict(SD), dict(num_inference_steps=3)),
    ("EulerDiscreteScheduler", dict(SD), dict(num_inference_steps=4)),
    # (Euler at zero terminal SNR starts from sigma 4096: fp32 rounding of diffusers' own arithmetic there is about the
    # tolerance here; tests/test_integration_diffusers.py covers it on a model of fixed scale)
    ("EulerDiscreteScheduler", V, dict(num_inference_steps=4, guidance_rescale=0.7)),
    ("EulerDiscreteScheduler", dict(SD), dict(timesteps=[999, 760, 420, 130, 15])),
    ("EulerDiscreteScheduler", dict(SD), dict(sigmas=[14.6, 5.2, 1.9, 0.45, 0.0])),
    ("EulerAncestralDiscreteScheduler", dict(SD), dict(num_inference_steps=4)),  # generator noise
    ("DPMSolverMultistepScheduler", dict(SD, use_karras_sigmas=True), dict(num_inference_steps=4)),
    ("DPMSolverMultistepScheduler", dict(SD, use_karras_sigmas=True, algorithm_type="sde-dpmsolver++"),
     dict(num_inference_steps=4)),
    ("DPMSolverMultistepScheduler", dict(SD), dict(timesteps=[999, 700, 400, 150, 20])),
    ("UniPCMultistepScheduler", dict(SD), dict(num_inference_steps=4)),
    ("HeunDiscreteScheduler", V, dict(num_inference_steps=3)),
    ("HeunDiscreteScheduler", dict(SD), dict(timesteps=[999, 600, 250, 40])),
    ("LCMScheduler", dict(SD), dict(num_inference_steps=4)),
    ("LCMScheduler", dict(SD), dict(timesteps=[999, 759, 499, 259])),
]


@needs_transformers
@pytest.mark.parametrize("name,config,call", SD_CASES,
                         ids=[f"{n}-{'-'.join(c)}-{i}" for i, (n, _, c) in enumerate(SD_CASES)])
def test_stable_diffusion_pipeline(sd_parts, name, config, call):
    components, embeds = sd_parts
    got, ref = run_both("StableDiffusionPipeline", components, name, config, **embeds, height=32, width=32,
                        guidance_scale=3.0, output_type="latent", **call)
    assert ref.shape == (2, 4, 16, 16)
    assert_close(f"StableDiffusionPipeline with {name} {config} {call}", got, ref, FP32_RTOL)


# the twelve drop-ins added after the first ten
MORE_SD_CASES = [
    ("LMSDiscreteScheduler", dict(SD), dict(num_inference_steps=5)),
    ("LMSDiscreteScheduler", dict(SD, use_karras_sigmas=True), dict(num_inference_steps=4)),
    ("KDPM2DiscreteScheduler", dict(SD), dict(num_inference_steps=3)),
    ("KDPM2AncestralDiscreteScheduler", dict(SD), dict(num_inference_steps=3)),  # generator noise
    ("DEISMultistepScheduler", dict(SD), dict(num_inference_steps=5)),
    ("IPNDMScheduler", {}, dict(num_inference_steps=5)),
    ("PNDMScheduler", dict(SD, skip_prk_steps=True), dict(num_inference_steps=5)),  # Stable Diffusion's PLMS
    ("PNDMScheduler", dict(SD), dict(num_inference_steps=4)),  # Runge-Kutta warm-up
    ("SASolverScheduler", dict(SD), dict(num_inference_steps=5)),  # generator noise
    ("TCDScheduler", dict(SD), dict(num_inference_steps=4, eta=0.3)),  # the pipeline's eta is TCD's gamma
    ("EDMEulerScheduler", {}, dict(num_inference_steps=4)),
    ("EDMDPMSolverMultistepScheduler", {}, dict(num_inference_steps=5)),
    # with noise_sampler_seed the drop-in takes diffusers' own Brownian-tree draws (torchsde; without the seed both
    # draw at random: Philox of the same law in fastdiff)
    ("DPMSolverSDEScheduler", dict(SD, noise_sampler_seed=3), dict(num_inference_steps=3)),
]


@needs_transformers
@pytest.mark.parametrize("name,config,call", MORE_SD_CASES,
                         ids=[f"{n}-{i}" for i, (n, _, _) in enumerate(MORE_SD_CASES)])
def test_stable_diffusion_pipeline_more_dropins(sd_parts, name, config, call):
    if name == "DPMSolverSDEScheduler" and importlib.util.find_spec("torchsde") is None:
        pytest.skip("diffusers' DPMSolverSDEScheduler needs torchsde (pip install -e '.[test]' installs it)")
    test_stable_diffusion_pipeline(sd_parts, name, config, call)


IMG2IMG_CASES = [
    ("DDIMScheduler", dict(SD), 5),
    ("DDPMScheduler", dict(SD), 4),
    ("EulerDiscreteScheduler", dict(SD), 5),
    ("EulerAncestralDiscreteScheduler", dict(SD), 5),
    ("DPMSolverMultistepScheduler", dict(SD, use_karras_sigmas=True), 5),
    ("UniPCMultistepScheduler", dict(SD), 5),
    ("HeunDiscreteScheduler", dict(SD), 4),  # begins at the second of a repeated timestep's pair
    ("LCMScheduler", dict(SD), 4),
]


@needs_transformers
@pytest.mark.parametrize("name,config,steps", IMG2IMG_CASES)
def test_stable_diffusion_img2img_pipeline(sd_parts, name, config, steps):
    """img2img starts part-way (set_begin_index(t_start * order)) from add_noise of the encoded image."""
    components, embeds = sd_parts
    got, ref = run_both("StableDiffusionImg2ImgPipeline", components, name, config, **embeds, image=start_image(32),
                        strength=0.6, num_inference_steps=steps, guidance_scale=3.0, output_type="latent")
    assert ref.shape == (2, 4, 16, 16)
    assert_close(f"StableDiffusionImg2ImgPipeline with {name} {config}", got, ref, FP32_RTOL)


# ---------------------------------------------------------------------------------------------------------------
# FluxPipeline and StableDiffusion3Pipeline (transformers on flow matching; the pipelines pass sigmas= themselves)
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def flux_parts():
    """(components without the scheduler, prompt embeddings): 16 x 16 latents of 1 channel for 16 x 16 images."""
    transformer = tiny(lambda: diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8]))
    vae = tiny(lambda: diffusers.AutoencoderKL(
        sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1,
        latent_channels=1, norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False,
        shift_factor=0.0609, scaling_factor=1.5035))
    components = dict(vae=vae, transformer=transformer, text_encoder=None, tokenizer=None, text_encoder_2=None,
                      tokenizer_2=None)
    g = torch.Generator().manual_seed(5)
    embeds = dict(prompt_embeds=torch.randn(2, 5, 32, generator=g),
                  pooled_prompt_embeds=torch.randn(2, 32, generator=g))
    return components, embeds


FLUX_CASES = [
    (FLUX, dict(num_inference_steps=4)),  # the pipeline's own sigmas= (linspace) and mu= (resolution shift)
    (FLUX, dict(sigmas=[1.0, 0.72, 0.41, 0.13])),  # the user's sigmas=
    (FLUX, dict(sigmas=[1.0, 0.5, 0.5, 0.2])),  # a repeated sigma: a step of length 0
    (dict(num_train_timesteps=1000, shift=3.0), dict(num_inference_steps=3)),  # static shift, no mu
    (dict(FLUX, use_karras_sigmas=True), dict(num_inference_steps=4)),
]


@needs_transformers
@pytest.mark.parametrize("config,call", FLUX_CASES,
                         ids=["default", "sigmas", "repeated-sigma", "static-shift", "karras"])
def test_flux_pipeline(flux_parts, config, call):
    components, embeds = flux_parts
    got, ref = run_both("FluxPipeline", components, "FlowMatchEulerDiscreteScheduler", config, **embeds, height=16,
                        width=16, guidance_scale=3.5, output_type="latent", **call)
    assert ref.shape == (2, 64, 4)  # packed latents: 16 x 16 latent pixels, 1 channel, as 64 patches of 2 x 2
    assert_close(f"FluxPipeline {config} {call}", got, ref, FP32_RTOL)


@needs_transformers
@pytest.mark.parametrize("config", [FLUX, dict(num_train_timesteps=1000, shift=3.0)], ids=["dynamic", "static"])
def test_flux_img2img_pipeline(flux_parts, config):
    """Starts part-way from scale_noise of the encoded image."""
    components, embeds = flux_parts
    got, ref = run_both("FluxImg2ImgPipeline", components, "FlowMatchEulerDiscreteScheduler", config, **embeds,
                        image=start_image(16), strength=0.7, height=16, width=16, num_inference_steps=5,
                        guidance_scale=3.5, output_type="latent")
    assert_close(f"FluxImg2ImgPipeline {config}", got, ref, FP32_RTOL)


@pytest.fixture(scope="module")
def sd3_parts():
    """(components without the scheduler, prompt embeddings): latents [2, 4, 16, 16] for 16 x 16 images."""
    transformer = tiny(lambda: diffusers.SD3Transformer2DModel(
        sample_size=32, patch_size=1, in_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=4,
        caption_projection_dim=32, joint_attention_dim=32, pooled_projection_dim=64, out_channels=4))
    vae = tiny(lambda: diffusers.AutoencoderKL(
        sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1,
        latent_channels=4, norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False,
        shift_factor=0.0609, scaling_factor=1.5035))
    components = dict(vae=vae, transformer=transformer, text_encoder=None, tokenizer=None, text_encoder_2=None,
                      tokenizer_2=None, text_encoder_3=None, tokenizer_3=None)
    g = torch.Generator().manual_seed(6)
    embeds = dict(prompt_embeds=torch.randn(2, 6, 32, generator=g),
                  negative_prompt_embeds=torch.randn(2, 6, 32, generator=g),
                  pooled_prompt_embeds=torch.randn(2, 64, generator=g),
                  negative_pooled_prompt_embeds=torch.randn(2, 64, generator=g))
    return components, embeds


SD3_CASES = [
    (SD3, dict(num_inference_steps=4)),
    (SD3, dict(sigmas=[1.0, 0.8, 0.5, 0.2])),  # the user's sigmas= (SD3's pipeline has no timesteps=)
    (dict(SD3, use_dynamic_shifting=True), dict(num_inference_steps=3, mu=0.8)),  # the user's mu=
]


@needs_transformers
@pytest.mark.parametrize("config,call", SD3_CASES, ids=["default", "sigmas", "mu"])
def test_stable_diffusion_3_pipeline(sd3_parts, config, call):
    components, embeds = sd3_parts
    got, ref = run_both("StableDiffusion3Pipeline", components, "FlowMatchEulerDiscreteScheduler", config, **embeds,
                        height=16, width=16, guidance_scale=4.0, output_type="latent", **call)
    assert ref.shape == (2, 4, 16, 16)
    assert_close(f"StableDiffusion3Pipeline {config} {call}", got, ref, FP32_RTOL)


@needs_transformers
def test_stable_diffusion_3_pipeline_flow_match_heun(sd3_parts):
    """FlowMatchHeun in SD3's pipeline (Flux's passes sigmas=, which FlowMatchHeun's set_timesteps lacks)."""
    components, embeds = sd3_parts
    got, ref = run_both("StableDiffusion3Pipeline", components, "FlowMatchHeunDiscreteScheduler", SD3, **embeds,
                        height=16, width=16, guidance_scale=4.0, output_type="latent", num_inference_steps=3)
    assert_close("StableDiffusion3Pipeline with FlowMatchHeunDiscreteScheduler", got, ref, FP32_RTOL)


@needs_transformers
def test_stable_diffusion_3_img2img_pipeline(sd3_parts):
    components, embeds = sd3_parts
    got, ref = run_both("StableDiffusion3Img2ImgPipeline", components, "FlowMatchEulerDiscreteScheduler", SD3,
                        **embeds, image=start_image(16), strength=0.7, num_inference_steps=5, guidance_scale=4.0,
                        output_type="latent")
    assert_close("StableDiffusion3Img2ImgPipeline", got, ref, FP32_RTOL)
