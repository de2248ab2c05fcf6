"""A tiny Llama with the real GPT-2 BPE tokenizer and a chat template, for chat tests.

The template has a system branch and a generation prompt, so a dropped message or a missing
`add_generation_prompt` changes the tokens.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'system' %}[SYS] {{ m['content'] }}\n"
            "{% else %}<|{{ m['role'] }}|> {{ m['content'] }}\n{% endif %}{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")
OTHER_TEMPLATE = "{% for m in messages %}{{ m['content'] | upper }} ## {% endfor %}=>"


def build_chat_model(folder: Path, in_tokenizer_config: bool = False) -> Path:
    """`in_tokenizer_config`: the template as older checkpoints store it (a `chat_template` key in
    tokenizer_config.json), else as transformers 5 saves it (chat_template.jinja)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from rosetool.default_model import ensure_default_model

    torch.manual_seed(7)
    config = AutoConfig.for_model("llama", vocab_size=50257, hidden_size=48, intermediate_size=80,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                  max_position_embeddings=256, bos_token_id=50256, eos_token_id=50256)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():   # norms away from 1 so a swapped or skipped norm weight shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(ensure_default_model())
    tokenizer.chat_template = TEMPLATE
    tokenizer.save_pretrained(folder)
    if in_tokenizer_config:
        (folder / "chat_template.jinja").unlink()
        cfg = json.loads((folder / "tokenizer_config.json").read_text())
        (folder / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": TEMPLATE}, indent=2))
    return folder


def hf_chat_greedy(folder: Path, messages: list[dict], max_new_tokens: int, template: str | None = None) -> str:
    """The reference: transformers' apply_chat_template + generate, decoded like the runtime decodes."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = tokenizer.apply_chat_template(messages, chat_template=template, add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=50256)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst
