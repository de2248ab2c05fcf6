"""The `--adapter` and `--adapters-only` flags, declared once for every command that takes them."""

from __future__ import annotations

import typer

AdapterOpt = typer.Option(None, "--adapter", help="LoRA adapter folder (HF PEFT adapter_config.json, or a "
                          "Megatron adapter rosetool wrote) merged into the model as it loads: W + scale * B @ A "
                          "in fp32, cast once. Repeat to apply several, in order.")
AdaptersOnlyOpt = typer.Option(False, "--adapters-only", help="Convert the one --adapter instead of the model: "
                               "write it in the target's LoRA layout (a PEFT folder for HF, Megatron-Bridge's "
                               "linear_in/linear_out for Megatron); SRC is its base model.")
