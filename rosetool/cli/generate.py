"""`rosetool generate`: stream a completion from the bundled runtime."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from rosetool.cli.adapter_options import AdapterOpt
from rosetool.cli.output import err
from rosetool.errors import RosetoolError


def _parse_token_ids(prompt: str) -> list[int]:
    try:
        return [int(t) for t in prompt.replace(",", " ").split()]
    except ValueError:
        raise RosetoolError("this model has no tokenizer: give the prompt as token ids, e.g. '1 2 3'") from None


def _has_tokenizer(model: str) -> bool:
    from rosetool.converters.sources import resolve_source
    from rosetool.converters.tokenizer import has_tokenizer
    return has_tokenizer(resolve_source(model))


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
    chat: bool = typer.Option(False, "--chat", help="PROMPT is a user message, rendered with the chat template."),
    chat_template: Optional[Path] = typer.Option(None, "--chat-template", help="Jinja file overriding the model's."),
    tp: int = typer.Option(1, "--tp", help="Tensor-parallel ranks: the model is sharded over this many processes."),
    ep: int = typer.Option(1, "--ep", help="Expert-parallel ranks (MoE): whole experts placed on this many "
                           "processes, shared with --tp's."),
    adapter: Optional[list[str]] = AdapterOpt,
) -> None:
    """Generate a completion for PROMPT, streaming tokens to stdout as they are produced."""
    if prompt is None:
        from rosetool.default_model import ensure_default_model

        model, prompt = str(ensure_default_model()), model
    template = None
    if chat:   # template and tokenizer are checked before the model loads
        from rosetool.converters.sources import resolve_source
        from rosetool.serve.chat_template import find_chat_template

        template = find_chat_template(resolve_source(model), chat_template)
        if template is None:
            raise RosetoolError("this model has no chat template (tokenizer_config.json or chat_template.jinja); "
                                "pass one with --chat-template FILE")
        if not _has_tokenizer(model):
            raise RosetoolError("this model has no tokenizer, so it cannot render chat messages")
    elif not _has_tokenizer(model):
        _parse_token_ids(prompt)   # a text prompt without a tokenizer fails now, not after the model loads
    from rosetool.runtime import LLM, SamplingParams

    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                            max_tokens=max_tokens)
    # one request: size the pool for it
    with LLM(model, dtype=dtype, device=device, max_num_seqs=1, tensor_parallel_size=tp,
             expert_parallel_size=ep, adapters=tuple(adapter or ())) as llm:
        if chat:
            from rosetool.serve.chat_template import chat_prompt_ids

            llm.add_request(chat_prompt_ids(llm.tokenizer, template, [{"role": "user", "content": prompt}]), params)
        else:
            llm.add_request(prompt if llm.tokenizer else _parse_token_ids(prompt), params)
        generated, reason = 0, None
        while llm.has_unfinished():
            for event in llm.step():
                generated += len(event.new_token_ids)
                reason = event.finish_reason or reason
                if event.text_delta is not None:
                    sys.stdout.write(event.text_delta)
                else:
                    sys.stdout.write("".join(f"{t} " for t in event.new_token_ids))
                sys.stdout.flush()
        max_model_len = llm.max_model_len
    sys.stdout.write("\n")
    if reason == "length" and generated < max_tokens:   # the context ran out before --max-tokens did
        err.print(f"note: stopped after {generated} of --max-tokens {max_tokens} tokens: prompt and output "
                  f"filled the model's context of {max_model_len} tokens", highlight=False, soft_wrap=True)
