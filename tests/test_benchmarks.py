"""The benchmark suite (`pytest benchmarks/ --benchmark-only`, README) at
least collects: a benchmark file that no longer imports or parses fails here
instead of on the day someone measures."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_benchmark_file_collects():
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "benchmarks/"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    collected = proc.stdout
    for name in ("test_ops.py::test_conv3x3_bias_relu", "test_ops.py::test_conv1x1_bias_add_relu",
                 "test_ops.py::test_grouped_conv3x3_bias_relu",
                 "test_inference.py", "test_blocks.py", "test_train.py"):
        assert name in collected, name
