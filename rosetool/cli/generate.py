"""`rosetool generate`: stream a completion from the bundled runtime."""

from __future__ import annotations

import sys
from typing import Optional

import typer

from rosetool.errors import RosetoolError


def _parse_token_ids(prompt: str) -> list[int]:
    try:
        return [int(t) for t in prompt.replace(",", " ").split()]
    except ValueError:
        raise RosetoolError("this model has no tokenizer: give the prompt as token ids, e.g. '1 2 3'") from None


def generate(
    model: str = typer.Argument(..., help="Model folder or hub id; if it is the only argument, it is "
                                          "the prompt and the embedded default model is used."),
    prompt: Optional[str] = typer.Argument(None, help="Prompt text (token ids if the model has no tokenizer)."),
    max_tokens: int = typer.Option(64, "--max-tokens", help="Tokens to generate at most."),
    temperature: float = typer.Option(1.0, "--temperature", help="0 for greedy decoding."),
    top_k: int = typer.Option(-1, "--top-k", help="-1 disables."),
    top_p: float = typer.Option(1.0, "--top-p"),
    seed: Optional[int] = typer.Option(None, "--seed", help="Repeatable sampling."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="float32, float16 or bfloat16."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu or cuda (default: cuda if available)."),
    tp: int = typer.Option(1, "--tp", help="Tensor-parallel ranks: the model is sharded over this many processes."),
) -> None:
    """Generate a completion for PROMPT, streaming tokens to stdout as they are produced."""
    from rosetool.runtime import LLM, SamplingParams

    if prompt is None:
        from rosetool.default_model import ensure_default_model

        model, prompt = str(ensure_default_model()), model
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                            max_tokens=max_tokens)
    # one request: size the pool for it
    with LLM(model, dtype=dtype, device=device, max_num_seqs=1, tensor_parallel_size=tp) as llm:
        llm.add_request(prompt if llm.tokenizer else _parse_token_ids(prompt), params)
        while llm.has_unfinished():
            for event in llm.step():
                if event.text_delta is not None:
                    sys.stdout.write(event.text_delta)
                else:
                    sys.stdout.write("".join(f"{t} " for t in event.new_token_ids))
                sys.stdout.flush()
    sys.stdout.write("\n")
