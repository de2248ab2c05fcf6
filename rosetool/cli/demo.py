"""`rosetool demo`: the whole path on the embedded default model, offline, on CPU, in under a minute."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from .output import err, out


def demo(workdir: Optional[Path] = typer.Option(None, "--workdir", help="Keep the outputs here (default: a temp folder)."),
         prompt: str = typer.Option("Hello world", "--prompt", help="Prompt for the generation step.")) -> None:
    """Build a small GPT-2 from a fixed seed, convert it HF -> native -> HF, verify logits, generate."""
    from ..converters.api import convert
    from ..default_model import ensure_default_model
    from ..verify import verify

    rows: list[tuple[str, str, str]] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = workdir or Path(tmp)
        t0 = time.perf_counter()
        hf = ensure_default_model()
        rows.append(("default model", str(hf), f"{time.perf_counter() - t0:.1f} s"))
        native, back = work / "native", work / "hf-export"
        for src, dst, to in [(hf, native, "native"), (native, back, "hf")]:
            err.print(f"converting {src} -> {dst}")
            r = convert(src, dst, to, force=True)
            rows.append((f"convert -> {to}", f"{r.num_tensors} tensors, {r.nbytes / 1e6:.0f} MB", f"{r.seconds:.1f} s"))
        for a, b in [(hf, native), (hf, back)]:
            t0 = time.perf_counter()
            v = verify(str(a), str(b))
            verdict = "PASS" if v.passed else "FAIL"
            rows.append((f"verify {b.name}", f"{verdict}: max |diff| {v.max_abs_diff:.1e}, greedy {v.greedy_agreement:.0%}",
                         f"{time.perf_counter() - t0:.1f} s"))
        rows.append(_generate(hf, native, prompt))
    table = Table("step", "result", "time", title="rosetool demo (embedded GPT-2, random weights)")
    for row in rows:
        table.add_row(*row)
    out.print(table)


def _generate(hf: Path, native: Path, prompt: str, new_tokens: int = 16) -> tuple[str, str, str]:
    """Greedy tokens from rosetool's paged runtime (native weights) against HF generate (HF weights)."""
    import torch
    from transformers import AutoModelForCausalLM

    from ..runtime import LLM, SamplingParams
    t0 = time.perf_counter()
    llm = LLM(str(native), device="cpu")
    ours = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True))[0]
    model = AutoModelForCausalLM.from_pretrained(hf).eval()
    ids = torch.tensor([ours.prompt_token_ids])
    ref = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
    same = ref[0, ids.shape[1]:].tolist() == ours.token_ids
    return ("generate (greedy)", f"{len(ours.token_ids)} tokens, identical to HF generate: {'yes' if same else 'NO'}",
            f"{time.perf_counter() - t0:.1f} s")
