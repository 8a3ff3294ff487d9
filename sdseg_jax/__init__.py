"""sdseg_jax: SDSeg (Lin et al., MICCAI 2024) in JAX/Flax.

A latent-diffusion segmenter with a single-step reverse process: a frozen kl-f8 VAE, a trainable
vision encoder and an LDM UNet, numerically identical to the official PyTorch implementation.
"""

__version__ = "0.1.0"
