"""Mixture-of-experts models over two gloo processes: `--tp 2` (experts' ffn split, router replicated), `--ep 2`
(whole experts per rank, attention replicated) and `--tp 2 --ep 2` give the greedy tokens of one process and of
transformers' `generate`, with batching, prefix caching and preemption by recompute on.

Mixtral has 5 experts, so expert parallel splits them 3 + 2; Qwen2-MoE brings a gated shared expert, attention
biases and a dense layer; Qwen3-MoE per-head q/k norms and renormalised top-3; DeepSeek-V3 latent attention (heads
split, latent cache whole on each rank), sigmoid scores with a choice bias, group-limited routing, a shared expert
and a dense first layer. Every weight is redrawn at random (norms around 1, biases around 0), so a rank adding a
shared expert or a bias twice, or an expert weighted on two ranks, changes the tokens.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import assert_a_killed_rank_ends_the_run, tp_workers
from rosetool.converters.api import convert
from rosetool.converters.sources import open_checkpoint
from rosetool.runtime import LLM, SamplingParams
from rosetool.runtime.layout import ParallelLayout
from rosetool.runtime.tp_shard import shard_state
from test_deepseek import BASE as DEEPSEEK, build as build_deepseek
from test_moe_runtime_models import COMMON, GREEDY, PROMPTS, hf_greedy, randomise

MODELS = {   # name -> (model_type, config): head counts, vocabulary and dense/shared widths even, for two ranks
    "mixtral": ("mixtral", dict(hidden_size=32, intermediate_size=20, num_hidden_layers=2, num_local_experts=5,
                                num_experts_per_tok=2)),
    "qwen2_moe": ("qwen2_moe", dict(hidden_size=32, intermediate_size=40, moe_intermediate_size=14,
                                    shared_expert_intermediate_size=24, num_hidden_layers=3, num_experts=6,
                                    num_experts_per_tok=2, norm_topk_prob=False, mlp_only_layers=[1])),
    "qwen3_moe": ("qwen3_moe", dict(hidden_size=32, head_dim=12, intermediate_size=40, moe_intermediate_size=16,
                                    num_hidden_layers=2, num_experts=8, num_experts_per_tok=3, norm_topk_prob=True)),
    "deepseek_v3": ("deepseek_v3", {**DEEPSEEK, "num_attention_heads": 4, "num_key_value_heads": 4, "q_lora_rank": 20,
                                    "n_group": 4, "topk_group": 2}),
}
LAYOUTS = {"tp2": (2, 1), "ep2": (1, 2), "tp2-ep2": (2, 2)}
OPTIONS = dict(dtype="float32", device="cpu", block_size=4, num_kv_blocks=12)   # few blocks: preemption


def build(name: str, folder: Path) -> Path:
    model_type, config = MODELS[name]
    if model_type == "deepseek_v3":
        return build_deepseek(model_type, config, folder)
    from transformers import AutoConfig, AutoModelForCausalLM
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **{**COMMON, **config}))
    randomise(model)
    model.eval().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module", params=sorted(MODELS))
def case(request, tmp_path_factory):
    """The HF folder, transformers' greedy tokens and one process's."""
    path = build(request.param, tmp_path_factory.mktemp(request.param))
    expected = hf_greedy(path)
    single = [o.token_ids for o in LLM(path, **OPTIONS).generate(PROMPTS, GREEDY)]
    assert single == [expected[tuple(p)] for p in PROMPTS], request.param
    assert len({tuple(t) for t in single}) > 1 and any(len(set(t)) > 2 for t in single)   # tokens that tell
    return request.param, path, single


def test_olmoe_runs_expert_parallel(tmp_path):
    """OLMoE's q/k norm spans all heads, so `--tp` is refused (test_runtime_tp.py); `--ep 2` replicates attention."""
    from test_moe_runtime_models import build_moe_hf
    path = build_moe_hf("olmoe", tmp_path / "olmoe")
    expected = hf_greedy(path)
    with LLM(path, expert_parallel_size=2, **OPTIONS) as llm:
        outs = llm.generate(PROMPTS, GREEDY)
        assert llm.scheduler.num_preemptions > 0
    assert [o.token_ids for o in outs] == [expected[tuple(p)] for p in PROMPTS]


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_two_ranks_match_one_process_and_transformers(case, layout):
    name, path, single = case
    tp, ep = LAYOUTS[layout]
    with LLM(path, tensor_parallel_size=tp, expert_parallel_size=ep, **OPTIONS) as llm:
        args, whole = llm.model.args, llm.model_args
        experts = next(layer.moe.experts.up.weight for layer in llm.model.layers if layer.moe is not None)
        parallel = ParallelLayout(tp, ep)
        expected_shape = (len(parallel.experts(0, whole.num_experts)), 2 * whole.moe_intermediate_size // parallel.etp)
        assert tuple(experts.shape[:2]) == expected_shape   # rank 0's experts, whole or halved
        assert args.num_heads * tp == whole.num_heads
        outs = llm.generate(PROMPTS, GREEDY)
        assert llm.scheduler.num_preemptions > 0
        hits = llm.scheduler.block_manager.num_hit_blocks
        again = llm.generate([PROMPTS[4]], GREEDY)[0]
        assert llm.scheduler.block_manager.num_hit_blocks > hits   # the prefix cache served blocks
    assert [o.token_ids for o in outs] == single, (name, layout)
    assert again.token_ids == single[4]
    assert not tp_workers()


def expected_slice(key: str, full: torch.Tensor, rank: int, layout: ParallelLayout, args) -> torch.Tensor:
    """What rank `rank` should hold of native tensor `key`, cut by hand from the whole."""
    tp = layout.tp
    if ".moe.experts." in key:
        mine = full[layout.experts(rank, args.num_experts).start: layout.experts(rank, args.num_experts).stop]
        cut = lambda t, dim: t.chunk(layout.etp, dim=dim)[layout.etp_rank(rank)]   # noqa: E731
        if key.endswith("up.weight"):   # each expert [gate; up]: both halves cut alike
            return torch.cat([cut(t, 1) for t in mine.chunk(2, dim=1)], dim=1)
        return cut(mine, 2)
    if tp == 1 or key.endswith(("norm.weight", "router.weight", "shared_gate.weight")):
        return full
    if ".attn.qkv." in key:   # q heads split, the two KV heads one per rank (or shared by two ranks of four)
        hd, heads, kv = args.head_dim, args.num_heads, args.num_kv_heads
        q, k, v = full.split([heads * hd, kv * hd, kv * hd])
        first, rows = rank * kv // tp, max(kv // tp, 1) * hd
        return torch.cat([q.chunk(tp)[rank], k[first * hd: first * hd + rows], v[first * hd: first * hd + rows]])
    if key.endswith("up.weight"):   # [gate; up] of a dense MLP or the shared expert
        return torch.cat([t.chunk(tp)[rank] for t in full.chunk(2)])
    return full.chunk(tp, dim=1 if key.endswith(("attn.o.weight", "down.weight")) else 0)[rank]


@pytest.mark.parametrize("tp, ep", [(2, 1), (1, 2), (2, 2), (4, 2)])
def test_slices_are_the_layouts_cuts_of_the_whole_model(tmp_path, tp, ep):
    """Every rank's tensors, from the HF folder (per-expert tensors) and from the native one (stacked experts, read
    for this rank's rows only), are the whole model's tensors cut as the layout says. (4, 2): two experts' groups of
    two ranks, each expert's ffn halved."""
    from rosetool.canonical import ModelArgs
    from rosetool.converters.api import load_state
    hf = build("qwen2_moe", tmp_path / "hf")
    convert(hf, tmp_path / "native", "native")
    layout = ParallelLayout(tp, ep)
    for folder in (hf, tmp_path / "native"):
        ckpt = open_checkpoint(folder)
        args = ModelArgs.from_dict(ckpt.config)
        _, whole = load_state(ckpt, "native")
        for rank in range(layout.world):
            part = shard_state(ckpt, rank, tp, ep)
            assert part.keys() == whole.keys()
            for key, full in whole.items():
                assert torch.equal(part[key], expected_slice(key, full, rank, layout, args)), (folder.name, key, rank)


def test_sizes_that_do_not_split_are_refused_before_any_process_starts(tmp_path, cli):
    from conftest import build_hf
    from moe_models import build_moe_hf
    odd = build_moe_hf("mixtral", tmp_path / "odd", num_attention_heads=4, vocab_size=68, intermediate_size=21)
    gpt2 = build_hf("gpt2", tmp_path / "gpt2")
    refusals = [
        (odd, ["--tp", "2"], "layers.0.moe.experts.up.weight: 21 rows cannot be split over the 2 ranks sharing each "
                             "expert (tensor_parallel_size=2, expert_parallel_size=1)"),
        (odd, ["--ep", "8"], "layers.0.moe.experts.up.weight: 5 experts cannot be spread over expert_parallel_size=8"),
        (odd, ["--tp", "2", "--ep", "4"], "attention tensor-parallel over 2 of 4 ranks is not supported"),
        (odd, ["--tp", "4", "--ep", "3"], "expert_parallel_size=3 does not divide the 4 ranks"),
        (gpt2, ["--ep", "2"], "expert_parallel_size=2 needs a mixture-of-experts model"),
    ]
    for model, flags, message in refusals:
        res = cli("generate", model, "1 2 3", *flags, "--device", "cpu")
        assert res.code == 2 and message in res.err and "Traceback" not in res.err, (flags, res.err)
        assert len(res.err.strip().splitlines()) == 1, res.err
        assert not tp_workers()


@pytest.fixture(scope="module")
def qwen2_moe(tmp_path_factory):
    """One model for the command lines and the failure path; its tokens from one process (which the test above
    holds equal to transformers')."""
    path = build("qwen2_moe", tmp_path_factory.mktemp("qwen2-cli"))
    return path, LLM(path, dtype="float32", device="cpu").generate([PROMPTS[1]], GREEDY)[0].token_ids


def test_generate_and_bench_take_ep(qwen2_moe, cli):
    path, tokens = qwen2_moe
    res = cli("generate", path, " ".join(map(str, PROMPTS[1])), "--ep", "2", "--temperature", "0",
              "--max-tokens", str(len(tokens)), "--device", "cpu", "--dtype", "float32")
    assert res.code == 0, res.err
    assert [int(t) for t in res.out.split()] == tokens
    res = cli("bench", "offline", "--backend", "rosetool", "--model", path, "--device", "cpu", "--tp", "2", "--ep", "2",
              "--num-prompts", "3", "--input-len", "6", "--output-len", "4", "--warmup", "0", "--runs", "1", "--json")
    assert res.code == 0, res.err
    assert json.loads(res.out)["runs"][0]["total_output_tokens"] == 12
    assert not tp_workers()


def test_a_killed_expert_rank_ends_the_run_with_one_line(qwen2_moe):
    path, _ = qwen2_moe
    assert_a_killed_rank_ends_the_run(LLM(path, device="cpu", dtype="float32", expert_parallel_size=2))


def test_serve_with_tp_and_ep_answers_the_openai_client(tmp_path):
    """`serve --tp 2 --ep 2` on a Qwen2-MoE with the default model's GPT-2 tokenizer (one spare embedding row, so
    the vocabulary splits in two): the official client's greedy text, plain and streamed, equals one process's and
    transformers'."""
    import openai
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from rosetool.default_model import ensure_default_model
    from rosetool.serve.process import ServerProcess
    from test_moe_runtime_models import load_hf

    model_type, config = MODELS["qwen2_moe"]
    config = {**COMMON, **config, "vocab_size": 50258, "bos_token_id": 50256, "eos_token_id": 50256}
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **config))
    randomise(model)
    model.eval().save_pretrained(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(ensure_default_model())
    tokenizer.save_pretrained(tmp_path)
    prompt, n = "The quick brown fox", 12
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = load_hf(tmp_path).generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                                         pad_token_id=50256)
    expected = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    one = LLM(tmp_path, dtype="float32", device="cpu").generate([prompt], SamplingParams(temperature=0, max_tokens=n))
    assert one[0].text == expected and len(set(out[0, ids.shape[1]:].tolist())) > 2
    served = ["--served-model-name", "moe", "--dtype", "float32", "--device", "cpu", "--tp", "2", "--ep", "2"]
    with ServerProcess([str(tmp_path), *served]) as proc:
        client = openai.OpenAI(base_url=proc.base_url + "/v1", api_key="unused", max_retries=0)
        got = client.completions.create(model="moe", prompt=prompt, max_tokens=n, temperature=0)
        assert got.choices[0].text == expected
        stream = client.completions.create(model="moe", prompt=prompt, max_tokens=n, temperature=0, stream=True)
        assert "".join(chunk.choices[0].text for chunk in stream if chunk.choices) == expected
        assert proc.stop() == 0


def test_an_expert_rank_loads_about_half_the_experts(tmp_path):
    """Rank 0 of two expert-parallel ranks of an 8-expert Mixtral (72 MiB of fp32 experts, 6 MiB of the rest) grows
    its RSS by about half the experts, from HF's per-expert tensors and from native stacked ones alike."""
    import subprocess
    import sys

    from moe_models import build_moe_hf
    from test_tp_shard import LOAD, MB
    wide = dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=3, num_local_experts=8,
                num_attention_heads=4, vocab_size=2048)
    hf = build_moe_hf("mixtral", tmp_path / "hf", **wide)
    convert(hf, tmp_path / "native", "native")
    warm = build_moe_hf("mixtral", tmp_path / "warm")

    def peak(path, ep):
        out = subprocess.run([sys.executable, "-c", LOAD, str(path), str(warm), "1", str(ep)], check=True,
                             capture_output=True, text=True).stdout.split()
        before, high, weights = map(int, out)
        return high - before, weights

    experts = 3 * 8 * 3 * 256 * 1024 * 4   # layers x experts x (gate, up, down) x fp32
    for folder in (hf, tmp_path / "native"):
        (whole_peak, whole), (rank_peak, rank) = peak(folder, 1), peak(folder, 2)
        assert whole - rank == experts // 2, folder.name
        print(f"{folder.name}: peak RSS growth whole {whole_peak / MB:.0f} MB, rank 0 of ep 2 {rank_peak / MB:.0f} MB")
        assert rank_peak < (whole - experts) + 0.75 * experts, (folder.name, rank_peak / MB)   # not all experts
        assert rank_peak < rank + 24 * MB, (folder.name, rank_peak / MB, rank / MB)   # its half, one group extra
