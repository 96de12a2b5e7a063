"""A tiny denoising diffusion model (DDPM) on 2-D points: data, model, training, sampling, a DVC pipeline."""
