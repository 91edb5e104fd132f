"""The Triton kernels (fused hash-grid encoding, packed ray marcher) agree with their PyTorch references.

On a CUDA machine the kernels run on the GPU.  Elsewhere they run in Triton's interpreter
(TRITON_INTERPRET=1, set in a subprocess because it must be set before Triton is imported), so
CI checks the same kernel source on the CPU.  The check itself is benchmarks/check_kernels.py.
"""
import os
import subprocess
import sys

import pytest
import torch

from helpers import REPO as ROOT


def _run(device: str, interpret: bool) -> str:
    env = dict(os.environ)
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "check_kernels.py"), "--device", device],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_triton_kernels_match_references_in_interpreter():
    pytest.importorskip("triton", reason="Triton is not installed (it ships with CUDA builds of PyTorch)")
    assert "MISMATCH" not in _run("cpu", interpret=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_triton_kernels_match_references_on_gpu():
    assert "MISMATCH" not in _run("cuda", interpret=False)
