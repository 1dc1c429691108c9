"""difftrain: a JSON-config-driven diffusion-model trainer (one engine, two front doors)."""

__version__ = "0.1.0"
