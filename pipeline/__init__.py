"""wysiwyc: train Explainers for frozen image classifiers and run them at scale."""

__version__ = "0.1.0"
