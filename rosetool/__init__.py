"""rosetool: checkpoint conversion, verification and benchmarking for LLMs."""

__version__ = "0.1.0"
