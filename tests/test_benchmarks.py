"""The benchmark suite (`pytest benchmarks/ --benchmark-only`, README) at
least collects: a benchmark file that no longer imports or parses fails here
instead of on the day someone measures."""
import os
import subprocess
import sys

import pytest

from resnet_fused.ops import extension
from resnet_fused.ops.cpu import onednn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_benchmark_file_collects():
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "benchmarks/"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    collected = proc.stdout
    for name in ("test_ops.py::test_conv3x3_bias_relu", "test_ops.py::test_conv1x1_bias_add_relu",
                 "test_ops.py::test_grouped_conv3x3_bias_relu", "test_ops.py::test_conv_kxk_bias_relu",
                 "test_inference.py", "test_blocks.py", "test_train.py"):
        assert name in collected, name


def test_the_interleaved_convolution_timer_runs():
    """`python benchmarks/interleaved_convs.py` (the stem at batch 1, one
    round): a row per layer, both kernels timed, their outputs within fp32
    rounding of each other."""
    if not extension.is_loaded() or onednn.UNAVAILABLE is not None:
        pytest.skip(f"needs resnet_fused._C ({extension.load_error}) and oneDNN ({onednn.UNAVAILABLE})")
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import interleaved_convs
    finally:
        sys.path.pop(0)
    rows = interleaved_convs.main(["--rounds", "1", "--calls", "1", "--batch", "1", "--layers", "stem"])
    assert [(r["layer"], r["batch"]) for r in rows] == [("stem", 1)]
    assert rows[0]["onednn_ms"] > 0 and rows[0]["conv_gemm_ms"] > 0 and rows[0]["max_abs_diff"] < 1e-4
