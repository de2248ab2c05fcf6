"""DeepSeek-V2/V3 <-> Megatron (megatron-core's MLA + MoE layout): round trips at several layouts, megatron-core
loading rosetool's files with transformers' logits, rosetool reading files megatron-core wrote itself, and the
refusals for what megatron-core cannot express (docs/MEGATRON_DEEPSEEK.md)."""

from __future__ import annotations

import json
import re

import pytest
import torch

pytest.importorskip("megatron.core", reason="CI installs megatron-core==0.16.1; these tests need it")

import megatron_ref as ref
from family_checks import tensors
from test_deepseek import BASE, VOCAB, YARN, build, load_hf
from test_deepseek_mcore import hf_config, hf_model, megatron_args, to_mcore

IDS = torch.tensor([[0, 5, 17, 90, 42, 3, 64, 8, 11], [1, 2, 3, 4, 5, 6, 7, 8, 9]])
# Sizes TP=3 divides (local spec: the down projections too); expressible in megatron-core: V3's top-2-sum groups
# need top-k // topk_group == 2, V2's best-expert groups 1.
MG = {**BASE, "intermediate_size": 72, "moe_intermediate_size": 24, "kv_lora_rank": 18, "rms_norm_eps": 1e-6}
CASES = {
    "v3-qlora-groups-yarn": ("deepseek_v3", {**MG, "q_lora_rank": 21, "n_group": 4, "topk_group": 2,
                                             "num_experts_per_tok": 4, "rope_parameters": YARN}),
    "v3-direct-tied-dense0": ("deepseek_v3", {**MG, "q_lora_rank": None, "n_group": 1, "topk_group": 1,
                                              "num_experts_per_tok": 2, "first_k_dense_replace": 0,
                                              "tie_word_embeddings": True, "routed_scaling_factor": 1.0}),
    # rotate-half rope: megatron-core's MLA pairs neighbours, so the rotary rows are paired on the way in
    "v3-rope-halves": ("deepseek_v3", {**MG, "q_lora_rank": 21, "rope_interleave": False, "n_group": 1,
                                       "topk_group": 1, "num_experts_per_tok": 2}),
    "v2-greedy": ("deepseek_v2", {**MG, "q_lora_rank": None, "topk_method": "greedy",
                                  "rope_parameters": {**YARN, "mscale": 1.0, "mscale_all_dim": 1.0}}),
    "v2-groups-qlora": ("deepseek_v2", {**MG, "q_lora_rank": 18, "topk_method": "group_limited_greedy",
                                        "n_group": 4, "topk_group": 2, "num_experts_per_tok": 2,
                                        "n_shared_experts": 2, "routed_scaling_factor": 1.7}),
}
LAYOUTS = {"tp1": [], "tp3-ep2-pp3": ["--tp", 3, "--ep", 2, "--pp", 3], "te-tp3": ["--tp", 3, "--te-layout"]}


def ok(cli, *argv) -> None:
    res = cli(*argv)
    assert res.code == 0, res.err + res.out


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    model_type, config = CASES[request.param]
    return request.param, build(model_type, config, tmp_path_factory.mktemp(request.param) / "hf")


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_hf_megatron_hf_is_bit_identical(case, layout, cli, tmp_path):
    name, hf = case
    ok(cli, "convert", "hf-to-megatron", hf, tmp_path / "mg", *LAYOUTS[layout])
    ok(cli, "convert", "megatron-to-hf", tmp_path / "mg", tmp_path / "back")
    a, b = tensors(hf), tensors(tmp_path / "back")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    src, out = (json.loads((p / "config.json").read_text()) for p in (hf, tmp_path / "back"))
    for key in ("model_type", "rope_parameters", "q_lora_rank", "kv_lora_rank", "n_group", "topk_group",
                "first_k_dense_replace", "n_shared_experts", "routed_scaling_factor", "norm_topk_prob"):
        assert src.get(key) == out.get(key), (name, key)


@pytest.fixture(scope="module")
def mcore():
    with ref.single_process():
        yield


def test_megatron_core_loads_rosetool_output_with_transformers_logits(case, mcore, cli, tmp_path):
    name, hf = case
    ok(cli, "convert", "hf-to-megatron", hf, tmp_path / "mg")
    got = ref.logits_from_rank_file(tmp_path / "mg" / "release" / "mp_rank_00" / "model_optim_rng.pt", IDS)
    assert got.shape[-1] == 128
    with torch.no_grad():
        want = load_hf(hf)(IDS).logits
    torch.testing.assert_close(got[..., :VOCAB], want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", ["v2-groups-qlora", "v3-qlora-groups-yarn"])
def test_megatron_core_tp2_loads_rosetool_tp2_shards(name, cli, tmp_path):
    """On the local spec the down projections are cut over TP as well: two gloo ranks load rosetool's two rank
    files strictly and give transformers' logits."""
    model_type, config = CASES[name]
    hf = build(model_type, {**config, "num_attention_heads": 4, "num_key_value_heads": 4, "hidden_size": 44,
                            "kv_lora_rank": 16, "q_lora_rank": 20}, tmp_path / "hf")
    ok(cli, "convert", "hf-to-megatron", hf, tmp_path / "mg", "--tp", 2)
    out = tmp_path / "logits.pt"
    torch.multiprocessing.spawn(ref.tp_worker, args=(2, str(tmp_path / "mg" / "release"), IDS, str(out), ref.free_port()),
                                nprocs=2, join=True)
    with torch.no_grad():
        want = load_hf(hf)(IDS).logits
    torch.testing.assert_close(torch.load(out)[..., :VOCAB], want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("version,q_lora", [(3, True), (2, False)])
def test_rosetool_reads_a_checkpoint_megatron_core_wrote(version, q_lora, mcore, cli, tmp_path):
    """Megatron-LM's own args (no rosetool fields) and megatron-core's own state dict -> the HF model back."""
    cfg = hf_config(version, q_lora)
    hf = hf_model(cfg)
    model = ref.build_model(megatron_args(cfg))
    model.load_state_dict({**{k: v for k, v in model.state_dict().items() if k.endswith("_extra_state")},
                           **to_mcore(hf, cfg)}, strict=True)
    ref.save_torch(model, megatron_args(cfg), tmp_path / "mg", 7)
    ok(cli, "convert", "megatron-to-hf", tmp_path / "mg", tmp_path / "back")
    back = tensors(tmp_path / "back")
    state = {k: v for k, v in hf.state_dict().items() if "experts.gate_up_proj" not in k and "experts.down_proj" not in k}
    for key, value in state.items():
        assert torch.equal(back[key], value), key
    with torch.no_grad():
        torch.testing.assert_close(load_hf(tmp_path / "back")(IDS).logits, hf(IDS).logits, atol=0, rtol=0)


REFUSED = {   # name -> (model_type, config, what the one-line error names)
    "v3-group-score": ("deepseek_v3", {**MG, "n_group": 4, "topk_group": 2, "num_experts_per_tok": 3},
                       "best num_experts_per_tok // topk_group = 1 experts summed"),
    "v3-raw-sigmoid": ("deepseek_v3", {**MG, "n_group": 1, "topk_group": 1, "norm_topk_prob": False},
                       "megatron-core always renormalises the chosen sigmoid scores"),
    "attention-bias": ("deepseek_v3", {**MG, "n_group": 1, "topk_group": 1, "attention_bias": True},
                       "builds latent attention's projections without biases"),
    "norm-eps": ("deepseek_v3", {**BASE, "n_group": 1, "topk_group": 1, "rms_norm_eps": 1e-5},
                 "rms_norm_eps=1e-05: megatron-core applies it to the q/kv latent norms too"),
}


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_what_megatron_core_cannot_express_is_refused_in_one_line(name, cli, tmp_path):
    model_type, config, message = REFUSED[name]
    hf = build(model_type, config, tmp_path / "hf")
    res = cli("convert", "hf-to-megatron", hf, tmp_path / "mg")
    text = res.err + res.out
    assert res.code == 2 and message in " ".join(text.split()) and str(hf) in text and "Traceback" not in text
    assert not (tmp_path / "mg").exists()


@pytest.mark.parametrize("tp, message", [(2, "3 query groups cannot be split over TP=2"),
                                         (3, "linear_kv_down_proj.weight: shape [22, 45] cannot be split over TP=3")])
def test_tp_must_keep_heads_and_local_down_projections_whole(tp, message, cli, tmp_path):
    """Three heads cannot go two ways; on the local spec kv_lora_rank + qk_rope_head_dim = 22 rows cannot go three
    ways (the TE layout keeps the down projections whole, so TP=3 is fine there)."""
    hf = build("deepseek_v2", {**MG, "q_lora_rank": None, "kv_lora_rank": 16}, tmp_path / "hf")
    res = cli("convert", "hf-to-megatron", hf, tmp_path / "mg", "--tp", tp)
    assert res.code == 2 and "Traceback" not in res.err + res.out
    assert message in res.err + res.out, res.err + res.out
    assert cli("convert", "hf-to-megatron", hf, tmp_path / "te", "--tp", 3, "--te-layout").code == 0


def test_torch_dist_round_trip_in_transformer_engine_names(case, cli, tmp_path):
    """What Megatron-LM trains MLA with: the latent norms fused into the up projections, the norm of a dense
    layer into its fc1, every expert one slice of `experts.experts.linear_fc{1,2}.weight`."""
    name, hf = case
    ok(cli, "convert", "hf-to-megatron", hf, tmp_path / "mg", "--format", "torch_dist", "--tp", 2, "--ep", 2)
    ok(cli, "convert", "megatron-to-hf", tmp_path / "mg", tmp_path / "back")
    a, b = tensors(hf), tensors(tmp_path / "back")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    from torch.distributed.checkpoint import FileSystemReader
    stored = FileSystemReader(str(tmp_path / "mg" / "release")).read_metadata().state_dict_metadata
    names = {re.sub(r"^decoder\.layers\.(\d+\.)?", "", k) for k in stored if "_extra_state" not in k}
    assert {"input_layernorm.weight", "self_attention.linear_kv_up_proj.layer_norm_weight", "pre_mlp_layernorm.weight",
            "mlp.experts.experts.linear_fc1.weight", "mlp.experts.experts.linear_fc2.weight"} <= names, name
    if CASES[name][1]["q_lora_rank"]:
        assert "self_attention.linear_q_up_proj.layer_norm_weight" in names, name
    if CASES[name][1]["first_k_dense_replace"]:
        assert "mlp.linear_fc1.layer_norm_weight" in names, name
    assert not any(n.endswith(("kv_layernorm.weight", "q_layernorm.weight")) for n in names), name


def test_megatron_core_loads_rosetool_torch_dist_in_local_names(mcore, tmp_path):
    """megatron-core's dist_checkpointing loads rosetool's torch_dist into the local-spec model it builds from the
    saved args (the names are the local spec's; everything else is the writer the TE names use)."""
    from rosetool.converters.api import convert
    model_type, config = CASES["v3-qlora-groups-yarn"]
    hf = build(model_type, config, tmp_path / "hf")
    convert(hf, tmp_path / "mg", "megatron_dist_local")
    model = ref.load_torch_dist(tmp_path / "mg" / "release")
    with torch.no_grad():
        want = load_hf(hf)(IDS).logits
    torch.testing.assert_close(ref.logits(model, IDS)[..., :VOCAB], want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("version,q_lora", [(3, True), (2, False)])
def test_rosetool_reads_a_torch_dist_checkpoint_megatron_core_wrote(version, q_lora, mcore, cli, tmp_path):
    cfg = hf_config(version, q_lora)
    hf = hf_model(cfg)
    args = megatron_args(cfg)
    args.ckpt_format = "torch_dist"
    model = ref.build_model(args)
    model.load_state_dict({**{k: v for k, v in model.state_dict().items() if k.endswith("_extra_state")},
                           **to_mcore(hf, cfg)}, strict=True)
    ref.save_torch_dist(model, args, tmp_path / "mg", 5)
    assert cli("inspect", tmp_path / "mg").code == 0
    ok(cli, "convert", "megatron-to-hf", tmp_path / "mg", tmp_path / "back")
    with torch.no_grad():
        torch.testing.assert_close(load_hf(tmp_path / "back")(IDS).logits, hf(IDS).logits, atol=0, rtol=0)
    ok(cli, "reshard", tmp_path / "mg", tmp_path / "torch", "--tp", 2)   # local names stay local in torch format
    assert ref.load_rank(tmp_path / "torch" / "iter_0000005" / "mp_rank_00" / "model_optim_rng.pt")[1].keys() >= {
        "decoder.layers.0.self_attention.kv_layernorm.weight"}


def test_verify_runs_the_runtime_on_a_megatron_deepseek_checkpoint(case, cli, tmp_path):
    """The runtime loads the Megatron folder directly (converted in memory) and matches transformers."""
    name, hf = case
    ok(cli, "convert", "hf-to-megatron", hf, tmp_path / "mg", "--tp", 3, "--te-layout")
    res = cli("verify", tmp_path / "mg", hf, "--json")
    assert res.code == 0 and json.loads(res.out)["passed"] is True, (name, res.out, res.err)
