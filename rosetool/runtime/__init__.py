"""Bundled inference runtime: a paged-KV-cache engine with continuous batching (nano-vllm style)."""

from rosetool.runtime.engine import LLM
from rosetool.runtime.outputs import GenerationOutput, StepOutput
from rosetool.runtime.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams", "GenerationOutput", "StepOutput"]
