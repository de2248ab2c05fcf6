"""Tensor parallelism over two local gloo processes: greedy outputs equal one process and transformers
`generate`, token for token, with prefix caching and preemption on; `generate --tp`, `bench --tp`, torchrun, and bad sizes.

Norm weights and every bias are drawn at random too, so a bias added on both ranks (instead of once,
after the all-reduce) or a KV head given to the wrong rank changes the tokens.
"""

import json
import random
import socket
import subprocess
import sys

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

from conftest import tp_workers
from rosetool.errors import RosetoolError
from rosetool.runtime import LLM, SamplingParams

VOCAB = 128
NEW_TOKENS = 8
MODELS = {
    "gpt2": lambda: GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=48, n_head=6, vocab_size=VOCAB, n_positions=128)),
    "llama-gqa-bias": lambda: LlamaForCausalLM(LlamaConfig(
        hidden_size=48, intermediate_size=90, num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2,
        vocab_size=VOCAB, max_position_embeddings=128, attention_bias=True, mlp_bias=True)),
    "llama-kv1-tied": lambda: LlamaForCausalLM(LlamaConfig(
        hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
        vocab_size=VOCAB, max_position_embeddings=128, tie_word_embeddings=True)),
    "qwen3": lambda: Qwen3ForCausalLM(Qwen3Config(
        hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=24, vocab_size=VOCAB, max_position_embeddings=128)),
}
PROMPTS = [[random.Random(i).randrange(2, VOCAB) for _ in range(n)] for i, n in enumerate([3, 9, 17, 26])]
PROMPTS.append(PROMPTS[3][:20] + [5, 6, 7])   # shares five 4-token blocks with the previous prompt
GREEDY = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)


def randomised(model):
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.5)
            elif "norm" in name or "ln_" in name:
                p.normal_(1, 0.3) if name.endswith("weight") else p.normal_(0, 0.3)
            else:
                p.normal_(0, 2.0)   # biases: large enough that one added twice shows
    model.generation_config.eos_token_id = None   # run on past EOS, like ignore_eos
    return model.eval()


def build(name, path):
    hf = randomised(MODELS[name]())
    hf.save_pretrained(path)
    expected = {}
    for p in PROMPTS:
        out = hf.generate(torch.tensor([p]), max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
        expected[tuple(p)] = out[0, len(p):].tolist()
    return path, expected


@pytest.fixture(scope="module", params=sorted(MODELS))
def tiny(request, tmp_path_factory):
    return build(request.param, tmp_path_factory.mktemp(request.param))


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    return build("gpt2", tmp_path_factory.mktemp("gpt2-cli"))


def test_two_ranks_match_one_rank_and_transformers(tiny):
    path, expected = tiny
    options = dict(dtype="float32", device="cpu", block_size=4, num_kv_blocks=12)   # small: forces preemption
    single = LLM(path, **options).generate(PROMPTS, GREEDY)
    with LLM(path, tensor_parallel_size=2, **options) as llm:
        assert llm.model.args.num_heads * 2 == llm.model_args.num_heads   # rank 0 holds half the heads
        outs = llm.generate(PROMPTS, GREEDY)
        assert llm.scheduler.num_preemptions > 0
        hits = llm.scheduler.block_manager.num_hit_blocks
        again = llm.generate([PROMPTS[4]], GREEDY)[0]
        assert llm.scheduler.block_manager.num_hit_blocks > hits   # the prefix cache served blocks
    for prompt, one, two in zip(PROMPTS, single, outs):
        assert two.token_ids == one.token_ids == expected[tuple(prompt)], f"prompt of {len(prompt)} tokens"
    assert again.token_ids == expected[tuple(PROMPTS[4])]
    assert not tp_workers()


def test_generate_cli_with_tp(gpt2, cli):
    path, expected = gpt2
    prompt = PROMPTS[1]
    res = cli("generate", path, " ".join(map(str, prompt)), "--tp", "2", "--temperature", "0",
              "--max-tokens", str(NEW_TOKENS), "--device", "cpu", "--dtype", "float32")
    assert res.code == 0, res.err
    assert [int(t) for t in res.out.split()] == expected[tuple(prompt)]


def test_sizes_that_do_not_divide_fail_before_any_process_starts(gpt2, cli):
    path, _ = gpt2
    with pytest.raises(RosetoolError, match="tensor_parallel_size=5 does not divide"):
        LLM(path, device="cpu", tensor_parallel_size=5)
    assert not tp_workers()
    res = cli("generate", path, "1 2 3", "--tp", "5", "--device", "cpu")
    assert res.code == 2 and "does not divide" in res.err and "Traceback" not in res.err


def test_models_the_specs_cannot_cut_fail_before_any_process_starts(cli, tmp_path):
    from moe_models import build_moe_hf
    from test_families import CASES, build

    olmoe = build_moe_hf("olmoe", tmp_path / "olmoe")   # its q/k norm spans all heads: no head split
    message = "q/k norm over all heads at once"
    with pytest.raises(RosetoolError, match=message):
        LLM(olmoe, device="cpu", tensor_parallel_size=2)
    assert not tp_workers()
    res = cli("generate", olmoe, "1 2 3", "--tp", "2", "--device", "cpu")
    assert res.code == 2 and message in res.err and "Traceback" not in res.err
    assert len(res.err.strip().splitlines()) == 1
    # every shipped dense spec has native tp rules; a spec added without them is refused by name
    from dataclasses import replace

    from rosetool.converters.sources import open_checkpoint
    from rosetool.runtime.tp_shard import check_shardable
    ckpt = open_checkpoint(build(*CASES["neox-parallel"][:2], tmp_path / "neox"))
    native = ckpt.spec.format("native")
    bare = replace(native, entries=[replace(e, tp=None) for e in native.entries])
    ckpt.spec = replace(ckpt.spec, formats={**ckpt.spec.formats, "native": bare})
    with pytest.raises(RosetoolError, match="gpt_neox declares no tp rules for its native tensors"):
        check_shardable(ckpt, 2)


def test_bench_rosetool_backend_with_tp(gpt2):
    from typer.testing import CliRunner

    from rosetool.cli.bench import app

    args = ["offline", "--backend", "rosetool", "--model", str(gpt2[0]), "--device", "cpu", "--tp", "2",
            "--num-prompts", "3", "--input-len", "6", "--output-len", "4", "--warmup", "0", "--runs", "1", "--json"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, (result.output, result.exception)
    assert json.loads(result.stdout)["runs"][0]["total_output_tokens"] == 12
    assert not tp_workers()


TORCHRUN_SCRIPT = """
import sys
from rosetool.runtime import LLM, SamplingParams
if __name__ == "__main__":
    with LLM(sys.argv[1], device="cpu", dtype="float32", tensor_parallel_size=2) as llm:
        out = llm.generate([[int(t) for t in sys.argv[2:]]], SamplingParams(temperature=0, max_tokens=8,
                                                                          ignore_eos=True))
    print("TOKENS", *out[0].token_ids)
"""


def test_runs_under_torchrun(gpt2, tmp_path):
    path, expected = gpt2
    script = tmp_path / "tp_script.py"
    script.write_text(TORCHRUN_SCRIPT)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                          "--master-port", str(port), str(script), str(path), *map(str, PROMPTS[1])],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    (line,) = [ln for ln in run.stdout.splitlines() if ln.startswith("TOKENS")]   # rank 0 prints, rank 1 serves
    assert [int(t) for t in line.split()[1:]] == expected[tuple(PROMPTS[1])]


def test_a_second_tensor_parallel_engine_waits_for_the_first(gpt2):
    path, _ = gpt2
    with LLM(path, device="cpu", tensor_parallel_size=2):
        with pytest.raises(RosetoolError, match="close the other tensor-parallel LLM first"):
            LLM(path, device="cpu", tensor_parallel_size=2)
        assert len(tp_workers()) == 1   # the first engine's worker only
    assert not tp_workers()   # (the parametrized test above opens one engine after another: close frees the group)


def test_a_failed_torch_distributed_init_earlier_does_not_break_it(gpt2):
    # torch names a process's groups by how many it has made; a failed init (here: port in use) counts.
    path, expected = gpt2
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        with pytest.raises(RuntimeError):
            torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{busy.getsockname()[1]}",
                                                 rank=0, world_size=2)
    with LLM(path, device="cpu", dtype="float32", tensor_parallel_size=2) as llm:
        assert llm.generate([PROMPTS[0]], GREEDY)[0].token_ids == expected[tuple(PROMPTS[0])]
