"""duodiff: U-ViT, early-exit (DeeDiff/AdaDiff) and DuoDiff diffusion sampling, measured."""

__version__ = "0.1.0"
