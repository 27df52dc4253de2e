"""Integrations with other stacks (diffusers, k-diffusion, torch.distributed)."""
