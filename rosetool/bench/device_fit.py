"""Default workload sizes that fit the device the benchmark runs on.

The documented workload (32 prompts of 128 tokens, 64 generated, 1 warm-up + 3 runs per mode) takes
10-16 minutes on a CPU: a first `rosetool bench` must not be a silent quarter hour. On CPU the sizes the
user did not set are scaled down so the default command takes about a minute; a note says so, and how
to ask for the full workload. Flags the user gave are never touched; on CUDA nothing changes.
"""

from __future__ import annotations

from dataclasses import replace

from rosetool.bench.cli_options import Options, flag_name

CPU_WORKLOAD = {"num_prompts": 8, "input_len": 32, "output_len": 16, "runs": 1}


def on_cpu(o: Options) -> bool:
    """Where an in-process backend will run; a server's device is not ours to guess."""
    if o.backend == "openai":
        return False
    if o.device is not None:
        return o.device == "cpu"
    import torch
    return not torch.cuda.is_available()


def fit_to_device(o: Options, defaulted: set[str]) -> tuple[Options, str | None]:
    """-> options to run with, and the note to print when something was scaled down."""
    scaled = {k: v for k, v in CPU_WORKLOAD.items() if k in defaulted}
    if not scaled or not on_cpu(o):
        return o, None
    full = " ".join(f"{flag_name(k)} {getattr(o, k)}" for k in scaled)
    small = ", ".join(f"{flag_name(k)} {v}" for k, v in scaled.items())
    return replace(o, **scaled), (f"CPU: scaled-down default workload ({small}) so this takes about a minute; "
                                  f"the documented workload: {full}")
