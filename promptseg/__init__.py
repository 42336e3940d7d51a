"""promptseg: CLIP-guided weakly-supervised segmentation, from training to an edge runtime."""

__version__ = "0.1.0"
