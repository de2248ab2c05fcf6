"""A fused native expert tensor is written expert by expert: peak memory follows the largest source
tensor, not the [E, 2*ffn, hidden] output (a DeepSeek-sized layer would be 15 GB)."""

import subprocess
import sys
import textwrap

import torch

from rosetool.converters.finite import _CHUNK
from rosetool.converters.synthetic import write_synthetic_hf

MB = 1 << 20


def test_fused_experts_do_not_materialise(tmp_path):
    hidden, ffn, experts = 512, 1024, 64
    config = {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "num_hidden_layers": 1,
              "hidden_size": hidden, "intermediate_size": ffn, "num_attention_heads": 4, "num_key_value_heads": 2,
              "num_local_experts": experts, "num_experts_per_tok": 2, "vocab_size": 256,
              "max_position_embeddings": 128}
    total = write_synthetic_hf(tmp_path / "src", config, dtype=torch.float32)
    largest_source = ffn * hidden * 4
    fused_up = experts * 2 * ffn * hidden * 2     # bf16 output of one layer's experts.up
    script = textwrap.dedent(f"""
        import torch
        from rosetool.converters.api import convert
        def status(field):
            return int(next(l for l in open('/proc/self/status') if l.startswith(field)).split()[1]) * 1024
        before = status('VmRSS')
        convert({str(tmp_path / 'src')!r}, {str(tmp_path / 'dst')!r}, 'native', dtype='bfloat16')
        print(before, status('VmHWM'))
    """)
    before, peak = map(int, subprocess.run([sys.executable, "-c", script], check=True, capture_output=True,
                                           text=True).stdout.split())
    growth = peak - before
    assert total > 380 * MB and fused_up == 128 * MB
    # what the conversion holds (sources and their converted rows), the NaN/Inf scan's two buffers, and
    # allocator slack (runs of this same conversion vary by +-10 MB) stay well below one fused tensor
    assert growth < 4 * largest_source + 2 * _CHUNK + 32 * MB < fused_up, \
        f"conversion grew RSS by {growth / MB:.0f} MB; one fused expert tensor is {fused_up / MB:.0f} MB"
    from safetensors import safe_open
    with safe_open(tmp_path / "dst" / "model.safetensors", "pt") as f, \
            safe_open(tmp_path / "src" / "model.safetensors", "pt") as g:
        up = f.get_slice("layers.0.moe.experts.up.weight")
        e = experts - 1
        want = torch.cat([g.get_tensor(f"model.layers.0.block_sparse_moe.experts.{e}.w{n}.weight") for n in (1, 3)])
        assert torch.equal(up[e:e + 1][0], want.to(torch.bfloat16))
