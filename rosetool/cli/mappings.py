"""`rosetool mappings list|show`: the architectures and formats the specs define."""

from __future__ import annotations

import typer
from rich.table import Table

from ..mappings.spec import all_specs, get_spec
from .help import examples, sub_app
from .output import out, print_json

app = sub_app("List and show the declarative mapping specs.")


@app.command("list", **examples("rosetool mappings list", "rosetool mappings list --json"))
def list_specs(as_json: bool = typer.Option(False, "--json", help="Print as JSON.")) -> None:
    """Every architecture variant, its spec file, HF class and formats."""
    rows = [{"name": s.name, "family": s.family, "file": s.file, "hf_architecture": s.architecture,
             "formats": sorted(s.formats)} for s in all_specs()]
    if as_json:
        print_json(rows)
        return
    table = Table("name", "family", "spec file", "HF architecture", "formats")
    for r in rows:
        table.add_row(r["name"], r["family"], r["file"], r["hf_architecture"] or "-", ", ".join(r["formats"]))
    out.print(table)


@app.command("show", **examples("rosetool mappings show llama", "rosetool mappings show gpt2 --format hf"))
def show(name: str = typer.Argument(..., help="Architecture name, e.g. gpt2, llama, qwen3."),
         fmt: str = typer.Option(None, "--format", help="Show only this format's tensors."),
         as_json: bool = typer.Option(False, "--json", help="Print as JSON.")) -> None:
    """Canonical tensors, config defaults and each format's key -> canonical mapping with its ops."""
    spec = get_spec(name)
    formats = [spec.format(fmt)] if fmt else list(spec.formats.values())
    data = {"name": spec.name, "file": spec.file, "description": spec.description, "config": dict(spec.config),
            "tensors": {t.name: {"shape": list(t.shape), "when": t.when} for t in spec.tensors},
            "formats": {f.name: [{"key": e.key, "from": list(e.sources), "ops": list(e.ops), "when": e.when,
                                  "tp": e.tp} for e in f.entries] for f in formats}}
    if as_json:
        print_json(data)
        return
    out.print(f"[bold]{spec.name}[/] ({spec.file}): {spec.description}")
    canon = Table("canonical tensor", "shape", "when")
    for t in spec.tensors:
        canon.add_row(t.name, " x ".join(map(str, t.shape)), t.when or "")
    out.print(canon)
    for f in formats:
        table = Table("key", "from", "ops", title=f"format {f.name}")
        for e in f.entries:
            table.add_row(e.key, ", ".join(e.sources), " -> ".join(map(str, e.ops)) or "=")
        out.print(table)
