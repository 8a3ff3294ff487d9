"""The three SDSeg networks (kl-f8 VAE, vision encoder, LDM UNet) as Flax Linen modules, NHWC."""
