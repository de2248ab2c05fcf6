"""The chat template that travels with a model, and messages rendered through it.

The template is looked up where transformers and vLLM look (`chat_template.jinja`, then
`tokenizer_config.json`'s `chat_template`), unless `--chat-template FILE` overrides it. Rendering goes
through the tokenizer's own `apply_chat_template` (transformers' sandboxed Jinja), so the prompt is
the one `transformers` and vLLM build for the same messages. A model without a template is an
error, never a guessed format.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rosetool.errors import RosetoolError


def find_chat_template(folder: Path, override: Path | None = None) -> str | None:
    if override is not None:
        if not override.is_file():
            raise RosetoolError(f"--chat-template {override}: no such file")
        return override.read_text()
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    config = folder / "tokenizer_config.json"
    if not config.is_file():
        return None
    try:
        template = json.loads(config.read_text()).get("chat_template")
    except ValueError as exc:
        raise RosetoolError(f"{config}: not valid JSON ({exc})") from None
    if isinstance(template, list):   # named templates: the one called "default" serves plain chat
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    return template if isinstance(template, str) else None


def _text_content(content: Any) -> str:
    """OpenAI lets `content` be a list of parts; templates expect a string, so text parts are joined."""
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
        return "".join(str(p.get("text", "")) for p in content)
    raise RosetoolError("message content must be a string or a list of text parts")


def chat_prompt_ids(tokenizer: Any, template: str | None, messages: list[dict[str, Any]],
                    add_generation_prompt: bool = True) -> list[int]:
    """Token ids of the rendered conversation, tokenised as `apply_chat_template(tokenize=True)` does."""
    if template is None:
        raise RosetoolError("this model has no chat template (tokenizer_config.json or chat_template.jinja); "
                            "pass one with --chat-template FILE or use completions")
    if tokenizer is None:
        raise RosetoolError("this model has no tokenizer, so it cannot render chat messages")
    if not messages:
        raise RosetoolError("messages must not be empty")
    messages = [{**m, "content": _text_content(m.get("content"))} for m in messages]
    from jinja2 import TemplateError

    try:
        text = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
    except TemplateError as exc:
        raise RosetoolError(f"chat template: {exc}") from None
    return tokenizer.encode(text, add_special_tokens=False)
