"""distill-engine: teacher→student distillation of BERT-family models on our own kernels and loop."""

__version__ = "0.1.0"
