"""Conversion streams: peak memory stays near the largest tensor, whatever the checkpoint's size."""

import subprocess
import sys
import textwrap

import torch

from rosetool.converters.synthetic import gpt2_config, write_synthetic_hf

MB = 1 << 20


def test_peak_rss_does_not_grow_with_checkpoint_size(tmp_path):
    # 16 layers of 1024 wide in fp32: ~800 MB on disk, largest tensor (c_fc) 16 MB.
    total = write_synthetic_hf(tmp_path / "src", gpt2_config(n_layer=16, n_embd=1024), dtype=torch.float32)
    largest = 4 * 1024 * 1024 * 4
    script = textwrap.dedent(f"""
        from rosetool.converters.api import convert
        def status(field):   # VmHWM, unlike ru_maxrss, is not inherited from the parent across exec
            return int(next(l for l in open('/proc/self/status') if l.startswith(field)).split()[1]) * 1024
        before = status('VmRSS')
        convert({str(tmp_path / 'src')!r}, {str(tmp_path / 'dst')!r}, 'native')
        print(before, status('VmHWM'))
    """)
    before, peak = map(int, subprocess.run([sys.executable, "-c", script], check=True, capture_output=True,
                                           text=True).stdout.split())
    growth = peak - before
    assert total > 700 * MB
    assert growth < 4 * largest + 64 * MB, f"conversion grew RSS by {growth / MB:.0f} MB for a {total / MB:.0f} MB model"
