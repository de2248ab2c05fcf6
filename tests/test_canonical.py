"""The canonical config refuses wrong types and ranges by field name, for every field."""

from __future__ import annotations

from dataclasses import fields

import pytest

from rosetool.canonical import FIELDS, ModelArgs
from rosetool.errors import RosetoolError

GOOD = dict(vocab_size=97, hidden_size=48, num_layers=3, num_heads=6, num_kv_heads=2, head_dim=8,
            intermediate_size=70, max_position_embeddings=33)


def test_every_field_has_a_check():
    assert {f.name for f in fields(ModelArgs)} == set(FIELDS)


@pytest.mark.parametrize("overrides", [
    {}, {"rope_theta": None, "position": "learned"}, {"rope_theta": 500000}, {"eos_token_id": [1, 2]},
    {"bos_token_id": 0, "sliding_window": 7, "norm": "layernorm", "norm_bias": True, "glu": False},
    {"rope_scaling": {"rope_type": "linear", "factor": 2.0}, "qk_norm": True, "tie_word_embeddings": True},
])
def test_valid_configs_load(overrides):
    args = ModelArgs(**GOOD, **overrides)
    assert all(getattr(args, k) == v for k, v in overrides.items())


@pytest.mark.parametrize("field,value,message", [
    ("vocab_size", "500", "must be an integer, got '500' (str)"),
    ("vocab_size", 500.0, "must be an integer"),
    ("num_layers", 2.5, "must be an integer, got 2.5"),
    ("num_layers", True, "must be an integer, got True (bool)"),
    ("num_heads", 0, "must be >= 1, got 0"),
    ("hidden_size", -48, "must be >= 1"),
    ("head_dim", None, "is required"),
    ("max_position_embeddings", [33], "must be an integer"),
    ("norm_eps", "1e-5", "must be a finite number"),
    ("norm_eps", float("nan"), "must be a finite number"),
    ("norm_eps", -1e-5, "must be >= 0"),
    ("rope_theta", 0, "must be >= 1e-09"),
    ("rope_theta", float("inf"), "must be a finite number"),
    ("norm", "batchnorm", "'batchnorm' is not supported; supported: layernorm, rmsnorm"),
    ("activation", 3, "must be a string"),
    ("position", "alibi", "'alibi' is not supported"),
    ("glu", 1, "must be true or false, got 1 (int)"),
    ("qkv_bias", "false", "must be true or false"),
    ("rope_scaling", [1], "must be an object"),
    ("sliding_window", 0, "must be >= 1"),
    ("bos_token_id", -1, "must be >= 0"),
    ("eos_token_id", [], "must be a token id or a list of token ids"),
    ("eos_token_id", [1, -2], "must be >= 0"),
    ("eos_token_id", [1, 2.0], "must be a token id or a list"),
])
def test_wrong_values_are_refused_by_name(field, value, message):
    with pytest.raises(RosetoolError) as exc:
        ModelArgs(**{**GOOD, field: value})
    assert str(exc.value).startswith(f"config field {field} ") and message in str(exc.value), str(exc.value)
