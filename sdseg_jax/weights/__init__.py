"""Reading official PyTorch weights (SDSeg, LDM, kl-f8) without torch."""
