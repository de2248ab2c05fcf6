"""YaRN RoPE against transformers' own `_compute_yarn_parameters`, and end to end on a Qwen2 model.

YaRN keeps fast-turning dims, interpolates slow ones by `factor`, ramps between them, and scales cos/sin by
an attention factor; each parameter set below moves one of those pieces (explicit attention factor, mscale
pair, truncate off, betas, a partial rotary head)."""

import pytest
import torch
from transformers import AutoConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from conftest import build_hf, hf_logits, runtime_logits
from rosetool.canonical import ModelArgs
from rosetool.converters.api import convert
from rosetool.runtime.rope import rope_attention_factor, rope_inv_freq

PARAMS = {
    "plain": {"factor": 4.0, "original_max_position_embeddings": 32},
    "mscale-pair": {"factor": 40.0, "original_max_position_embeddings": 64, "mscale": 1.0, "mscale_all_dim": 0.8},
    "attention-factor": {"factor": 2.0, "original_max_position_embeddings": 32, "attention_factor": 1.3},
    "betas-untruncated": {"factor": 8.0, "original_max_position_embeddings": 128, "beta_fast": 16, "beta_slow": 2,
                          "truncate": False},
}


@pytest.mark.parametrize("name", sorted(PARAMS))
@pytest.mark.parametrize("partial", [1.0, 0.5])
def test_inverse_frequencies_and_attention_factor_equal_transformers(name, partial):
    rope = {"rope_type": "yarn", "rope_theta": 50000.0, **PARAMS[name]}
    cfg = AutoConfig.for_model("llama", hidden_size=64, num_attention_heads=2, max_position_embeddings=512,
                               rope_parameters={**rope, "partial_rotary_factor": partial})
    want_inv, want_factor = ROPE_INIT_FUNCTIONS["yarn"](cfg, "cpu")
    args = ModelArgs(vocab_size=8, hidden_size=64, num_layers=1, num_heads=2, num_kv_heads=2, head_dim=32,
                     intermediate_size=8, max_position_embeddings=512, rope_theta=50000.0,
                     rope_scaling={k: v for k, v in rope.items() if k != "rope_theta"}, partial_rotary_factor=partial)
    assert torch.equal(rope_inv_freq(args), want_inv), name
    assert rope_attention_factor(args) == pytest.approx(want_factor, rel=1e-12), name


def test_qwen2_with_yarn_matches_transformers_past_the_original_context(tmp_path):
    hf = build_hf("qwen2", tmp_path / "hf", rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0,
                                                               "factor": 8.0, "original_max_position_embeddings": 16})
    convert(hf, tmp_path / "native", "native")
    tokens = torch.randint(0, 96, (2, 60), generator=torch.Generator().manual_seed(0))
    ref, got = hf_logits(hf, tokens), runtime_logits(tmp_path / "native", tokens)
    assert (ref - got).abs().max() < 1e-4
    plain = build_hf("qwen2", tmp_path / "plain")
    assert (hf_logits(plain, tokens) - ref).abs().max() > 1e-3   # the scaling changed the model: the test can see it
