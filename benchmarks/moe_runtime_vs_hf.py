"""The runtime's MoE layer against HF `generate` on the same tiny random MoE model, in one process (issues 11, 15).

    python benchmarks/moe_runtime_vs_hf.py [--model mixtral|deepseek_v3] [--prompts 16] [--input-len 64]
                                           [--output-len 64] [--runs 5]

`deepseek_v3` adds latent attention (the runtime caches the latent, HF its compressed KV too) and DeepSeek's
grouped sigmoid routing; the runtime's KV bytes per token are printed beside what expanded K/V would take.

Backends take turns, run after run (runtime with the grouped kernel, runtime with the reference kernel,
HF with its default experts kernel), so load from other processes on a shared machine falls on all of
them alike; each reports the median of its runs as output tokens per wall second and per CPU second of
this process (the latter is what the code costs, whatever else the machine is doing). All prompts have
the same length, so HF's batch needs no padding, and greedy outputs are compared token for token.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from rosetool.converters.synthetic import write_synthetic_hf
from rosetool.runtime import LLM, SamplingParams
from rosetool.runtime.moe import MoE, grouped_experts, reference_experts

MIXTRAL = {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "num_hidden_layers": 4,
           "hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 8, "num_key_value_heads": 2,
           "num_local_experts": 8, "num_experts_per_tok": 2, "vocab_size": 2048, "max_position_embeddings": 1024,
           "rms_norm_eps": 1e-5, "rope_theta": 1e6, "tie_word_embeddings": False}


DEEPSEEK_V3 = {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "num_hidden_layers": 4,
               "hidden_size": 256, "intermediate_size": 512, "moe_intermediate_size": 128, "num_attention_heads": 8,
               "num_key_value_heads": 8, "n_routed_experts": 16, "n_shared_experts": 1, "num_experts_per_tok": 4,
               "n_group": 4, "topk_group": 2, "routed_scaling_factor": 2.5, "norm_topk_prob": True,
               "first_k_dense_replace": 1, "kv_lora_rank": 128, "q_lora_rank": 192, "qk_rope_head_dim": 32,
               "qk_nope_head_dim": 64, "v_head_dim": 64, "vocab_size": 2048, "max_position_embeddings": 1024,
               "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": False}
MODELS = {"mixtral": MIXTRAL, "deepseek_v3": DEEPSEEK_V3}
Run = Callable[[], list[list[int]]]
HF = "HF generate (dynamic cache)"


def make_backends(llm: LLM, folder: Path, prompts: torch.Tensor, output_len: int) -> dict[str, Run]:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)

    def runtime(kernel) -> Run:
        def run() -> list[list[int]]:
            for m in llm.model.modules():
                if isinstance(m, MoE):
                    m.kernel = kernel
            return [o.token_ids for o in llm.generate(prompts.tolist(), params)]
        return run

    def hf_generate() -> list[list[int]]:
        with torch.no_grad():
            out = hf.generate(prompts, max_new_tokens=output_len, do_sample=False, pad_token_id=0)
        return out[:, prompts.shape[1]:].tolist()

    return {"rosetool runtime, grouped experts": runtime(grouped_experts),
            "rosetool runtime, reference experts": runtime(reference_experts), HF: hf_generate}


def bench(opts: argparse.Namespace, folder: Path) -> None:
    config = MODELS[opts.model]
    write_synthetic_hf(folder, config, dtype=torch.float32, std=0.05)
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(2, config["vocab_size"], (opts.prompts, opts.input_len), generator=gen)
    llm = LLM(folder, dtype="float32", device="cpu")
    backends = make_backends(llm, folder, prompts, opts.output_len)
    outputs = {name: run() for name, run in backends.items()}     # warm-up, and the greedy tokens
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in backends}
    for _ in range(opts.runs):
        for name, run in backends.items():
            wall, cpu = time.perf_counter(), time.process_time()
            run()
            times[name].append((time.perf_counter() - wall, time.process_time() - cpu))
    tokens = opts.prompts * opts.output_len
    base = statistics.median(tokens / w for w, _ in times[HF])
    print(f"{opts.model}; torch threads: {torch.get_num_threads()}, {opts.prompts} prompts x {opts.input_len} + "
          f"{opts.output_len} tokens, median of {opts.runs} interleaved runs")
    a = llm.runner.args
    per_token = llm.runner._block_bytes() // llm.runner.block_size
    expanded = a.num_layers * a.num_heads * (a.head_dim + (a.v_head_dim or a.head_dim)) * 4
    print(f"runtime KV cache: {per_token:,} bytes per token ({expanded:,} if K/V were stored per head)")
    print(f"{'backend':38} {'tok/s (wall)':>12} {'tok/CPU-s':>10} {'vs HF':>6}  greedy = HF")
    for name, runs in times.items():
        wall = statistics.median(tokens / w for w, _ in runs)
        cpu = statistics.median(tokens / c for _, c in runs)
        print(f"{name:38} {wall:12.1f} {cpu:10.1f} {wall / base:5.2f}x  {outputs[name] == outputs[HF]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=sorted(MODELS), default="mixtral")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--input-len", type=int, default=64)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--runs", type=int, default=5)
    opts = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="moe-bench-") as tmp:
        bench(opts, Path(tmp) / opts.model)


if __name__ == "__main__":
    main()
