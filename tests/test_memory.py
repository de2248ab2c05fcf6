"""Conversion streams: peak memory stays near the largest tensor, whatever the checkpoint's size."""

import subprocess
import sys
import textwrap

import pytest
import torch

from rosetool.converters.synthetic import gpt2_config, write_synthetic_hf

MB = 1 << 20
LARGEST = 4 * 1024 * 1024 * 4   # c_fc of a 1024-wide GPT-2 in fp32: 16 MB


@pytest.fixture(scope="module")
def big_gpt2(tmp_path_factory):
    # 16 layers of 1024 wide in fp32: ~800 MB on disk, largest tensor (c_fc) 16 MB.
    src = tmp_path_factory.mktemp("memory") / "src"
    return src, write_synthetic_hf(src, gpt2_config(n_layer=16, n_embd=1024), dtype=torch.float32)


def rss_growth_and_peak(call: str) -> tuple[int, int]:
    script = textwrap.dedent(f"""
        from rosetool.converters.api import convert
        from rosetool.converters.megatron import Layout, make_writer
        def status(field):   # VmHWM, unlike ru_maxrss, is not inherited from the parent across exec
            return int(next(l for l in open('/proc/self/status') if l.startswith(field)).split()[1]) * 1024
        before = status('VmRSS')
        {call}
        print(before, status('VmHWM'))
    """)
    before, peak = map(int, subprocess.run([sys.executable, "-c", script], check=True, capture_output=True,
                                           text=True).stdout.split())
    return peak - before, peak


def test_peak_rss_does_not_grow_with_checkpoint_size(big_gpt2, tmp_path):
    src, total = big_gpt2
    growth, _ = rss_growth_and_peak(f"convert({str(src)!r}, {str(tmp_path / 'dst')!r}, 'native')")
    assert total > 700 * MB
    assert growth < 4 * LARGEST + 64 * MB, f"conversion grew RSS by {growth / MB:.0f} MB for a {total / MB:.0f} MB model"


def test_megatron_torch_writer_at_tp2_stays_inside_the_bound(big_gpt2, tmp_path):
    """The torch format pickles a whole rank file, so the writer holds one rank's shards (half the model at
    TP 2) plus allocator slack, never the whole model; the process stays inside the issue's bound of
    1 GiB + 2x the largest tensor. (Streaming the rank file record by record would bring the growth down
    to the largest tensors, as for safetensors; not done yet, see docs/PERFORMANCE.md.)"""
    src, total = big_gpt2
    growth, peak = rss_growth_and_peak(
        f"convert({str(src)!r}, {str(tmp_path / 'meg')!r}, 'megatron', writer=make_writer(Layout(2, 1)))")
    assert growth < total, f"grew RSS by {growth / MB:.0f} MB for a {total / MB:.0f} MB model"
    assert peak < (1 << 30) + 2 * LARGEST, f"peak RSS {peak / MB:.0f} MB"
    assert sorted(p.parent.name for p in (tmp_path / "meg").rglob("model_optim_rng.pt")) == ["mp_rank_00", "mp_rank_01"]
