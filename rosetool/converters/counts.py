"""Layer and expert counts checked against what a checkpoint's files hold, before anything is built from them.

`num_layers` and `num_experts` are numbers in a config; the plan, the readers and the config codecs build
per-layer and per-expert lists from them. A config claiming 10^9 layers in a 1 MB checkpoint would fill
memory before any tensor is compared, so counts are checked first: crudely (every layer holds a tensor
of its own) before a config is read, exactly (the last layer's and the last expert's tensors are stored)
before a plan is expanded.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

from ..errors import CheckpointError
from ..mappings import expr
from ..mappings.spec import ArchSpec, Entry, Format, expand, is_layered, is_per_expert


def check_layer_count(num_layers: Any, tensor_count: int | None, where: str) -> None:
    """Every format rosetool reads stores each layer's weights under keys of that layer, so a checkpoint
    of N tensors has at most N layers. Non-integers are left to the field checks."""
    if tensor_count is None or not isinstance(num_layers, int) or isinstance(num_layers, bool):
        return
    if num_layers > tensor_count:
        raise CheckpointError(f"{where}: config says num_layers={num_layers}, but the checkpoint holds only "
                              f"{tensor_count} tensors")


def check_counts(spec: ArchSpec, fmt: Format, config: Mapping[str, Any], env: Mapping[str, Any],
                 find: Callable[[str], Sequence[int] | None], where: str) -> None:
    """The source must hold the tensors of its last layer and of its last expert (or, experts stacked in
    one tensor, a dim at least num_experts long). `find(key)` is the stored shape of a format key or None.
    The same entries the plan would expect are probed (their canonical tensors present at that layer), so
    a checkpoint that passes here is refused, if at all, by the plan's own missing-tensor check."""
    layers, experts = config["num_layers"], config.get("num_experts") or 0
    when = {t.name: t.when for t in spec.tensors}

    def expected(e: Entry, layer: int) -> bool:
        if e.when is not None and not expr.evaluate(e.when, {**env, "i": layer}):
            return False
        return all(s in when and (when[s] is None or expr.evaluate(when[s], {**config, "i": layer}))
                   for s in e.sources)

    def first(test: Callable[[Entry], bool], layer: int) -> Entry | None:
        return next((e for e in fmt.entries if is_layered(e.key) and test(e) and expected(e, layer)), None)

    last = layers - 1
    probe = first(lambda e: not is_per_expert(e.key) and not any(map(is_per_expert, e.sources)), last)
    if probe is not None and find(expand(probe.key, last)) is None:
        raise CheckpointError(f"{where}: config says num_layers={layers}, but tensor "
                              f"{expand(probe.key, last)!r} of layer {last} is missing")
    if not experts:
        return
    dense = set(config.get("mlp_only_layers") or ())
    moe = next((i for i in range(last, -1, -1) if i not in dense), None)   # at most len(dense) + 1 steps
    if moe is None:
        return
    each = first(lambda e: is_per_expert(e.key), moe)
    if each is not None and find(expand(each.key, moe, experts - 1)) is None:
        raise CheckpointError(f"{where}: config says num_experts={experts}, but tensor "
                              f"{expand(each.key, moe, experts - 1)!r} of expert {experts - 1} is missing")
    stacked = first(lambda e: not is_per_expert(e.key) and any(map(is_per_expert, e.sources)), moe)
    shape = find(expand(stacked.key, moe)) if stacked is not None else None
    if shape is not None and experts > max(shape, default=0):
        raise CheckpointError(f"{where}: config says num_experts={experts}, but tensor "
                              f"{expand(stacked.key, moe)!r} that stacks them has shape {list(shape)}")
