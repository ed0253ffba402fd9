"""thaw: fine-tune a pretrained image backbone into a classifier from little data, fast."""

__version__ = "0.1.0"
