"""`rosetool verify A B`: logit parity, exit 1 when over tolerance."""

from __future__ import annotations

from typing import Optional

import typer
from rich.table import Table

from .output import out, print_json


def verify(a: str = typer.Argument(..., help="First checkpoint (HF runs through transformers, others through rosetool)."),
           b: str = typer.Argument(..., help="Second checkpoint."),
           dtype: Optional[str] = typer.Option(None, "--dtype", help="Cast both to float32, float16 or bfloat16 "
                                               "(default: each at the dtype it stores; the tolerance follows "
                                               "the lower precision)."),
           device: str = typer.Option("cpu", "--device", help="cpu or cuda."),
           batch: int = typer.Option(2, "--batch", min=1, help="Sequences in the test batch."),
           seq_len: int = typer.Option(32, "--seq-len", min=1, help="Tokens per sequence."),
           seed: int = typer.Option(0, "--seed", help="Seed of the random token batch."),
           atol: Optional[float] = typer.Option(None, "--atol", help="Override the dtype's tolerance on max |diff|."),
           as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
           adapter: Optional[list[str]] = typer.Option(None, "--adapter", help="LoRA adapter folder merged into A "
                                                       "(runs A on rosetool's runtime); repeat to apply several in order.")) -> None:
    """Same tokens through both: max |logit diff| against a tolerance for their dtypes, greedy agreement."""
    from ..dtypes import parse_dtype
    from ..verify import verify as run_verify

    result = run_verify(a, b, parse_dtype(dtype), device, batch, seq_len, seed, atol, tuple(adapter or ()))
    if as_json:
        print_json(result.to_dict())
    else:
        how = "given with --atol" if atol is not None else f"{result.dtype}, scaled by max |logit| {result.max_abs_logit:.2f}"
        table = Table(title="logit parity", show_header=False)
        for k, v in [("A", f"{result.a} ({result.runner_a}, {result.dtype_a})"),
                     ("B", f"{result.b} ({result.runner_b}, {result.dtype_b})"),
                     ("batch", f"{result.tokens[0]} x {result.tokens[1]} tokens, {result.vocab} logits each"),
                     ("max |diff|", f"{result.max_abs_diff:.3e}"), ("mean |diff|", f"{result.mean_abs_diff:.3e}"),
                     *_criterion_rows(result, how),
                     ("greedy agreement", f"{result.greedy_agreement:.1%}"),
                     ("verdict", "[green]PASS[/]" if result.passed else "[red]FAIL[/]")]:
            table.add_row(k, v)
        out.print(table)
    if not result.passed:
        raise typer.Exit(1)


def _criterion_rows(result, how: str) -> list[tuple[str, str]]:
    """One side quantized: judged on the logits' cosine (max |diff| is printed, not judged)."""
    if result.criterion == "cosine":
        from ..verify import COSINE_PASS
        return [("min cosine", f"{result.min_cosine:.5f} (pass >= {COSINE_PASS}: one side is quantized, "
                 f"so its logits differ by design)")]
    return [("tolerance", f"{result.tolerance:.3e} ({how})"), ("min cosine", f"{result.min_cosine:.5f}")]
