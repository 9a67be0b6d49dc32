"""`resnet-fused-validate --device cpu --quick`: the CPU analogue of every
stage, its report, its exit status, and the loan script's CPU dry run."""
import json
import os
import subprocess
import sys

import pytest
import torch

from resnet_fused import validate
from resnet_fused.validate import model_checks, op_checks, report, speed
from resnet_fused.validate.common import Context

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# generous on a loaded 2-core CI machine; the command itself is under two minutes on an idle one
TIME_LIMIT = "420"
STAGE_LIMIT = "150"


def _load(out):
    with open(os.path.join(out, "report.json")) as f:
        doc = json.load(f)
    with open(os.path.join(out, "summary.md")) as f:
        return doc, f.read()


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("validate"))
    code = validate.main(["--device", "cpu", "--quick", "--out", out, "--time-limit", TIME_LIMIT,
                          "--stage-limit", STAGE_LIMIT])
    doc, md = _load(out)
    return code, doc, md


def _stage(doc, name):
    return next(s for s in doc["stages"] if s["name"] == name)


def _quick_context():
    return Context(torch.device("cpu"), True, 0, 1, os.devnull)


def test_quick_run_passes_every_stage(quick_run):
    code, doc, md = quick_run
    assert [s["name"] for s in doc["stages"]] == list(validate.STAGE_NAMES)
    bad = {s["name"]: (s["status"], s.get("log_tail", "")[-800:]) for s in doc["stages"] if s["status"] != "ok"}
    assert not bad
    failed = [r for s in doc["stages"] for r in s["rows"] if r.get("ok") is False]
    assert failed == []
    assert code == 0 and doc["exit_code"] == 0


def test_correctness_stages_ran_every_case(quick_run):
    """Each correctness stage wrote one check per case its plan holds (the
    plan is rebuilt here from the same functions, for the CPU)."""
    _, doc, _ = quick_run
    ctx = _quick_context()
    expected = {
        "ops": len(op_checks._tile_cases(ctx)) + len(op_checks._op_cases(ctx)) + len(op_checks._epilogue_cases(ctx)),
        "batch_norm": len(op_checks._bn_cases(ctx)),
    }
    for name, count in expected.items():
        checks = [r for r in _stage(doc, name)["rows"] if "ok" in r]
        assert count > 0 and len(checks) == count, name
    ops_rows = _stage(doc, "ops")["rows"]
    for backend in ("eager", "cpu", "triton"):
        assert any(r.get("backend") == backend for r in ops_rows), backend
    assert {r["table"] for r in ops_rows} == {"triton tilings (direct launch)", "ops.conv_bn_act per backend",
                                             "C++ epilogue vector/scalar paths"}
    assert {r["layer"] for r in ops_rows if "layer" in r} == set(op_checks.QUICK_LAYERS)
    models = _stage(doc, "models")["rows"]
    assert {r["model"] for r in models} == set(model_checks.MODELS)
    assert {r["backend"] for r in models if r["what"].startswith("train")} == {"cpu", "triton"}
    assert len([r for r in _stage(doc, "compile")["rows"] if r.get("ok")]) == 2  # two batch sizes
    assert _stage(doc, "cudagraph")["rows"][0]["ok"]


def test_environment_and_speed_tables(quick_run):
    _, doc, md = quick_run
    env = _stage(doc, "environment")["rows"]
    assert env[0]["torch"] == torch.__version__ and env[0]["backends_for_device"]
    assert {r["backend"] for r in env if r.get("table") == "backends"} == {"eager", "triton", "cuda", "cpu"}
    inference = _stage(doc, "speed")["rows"]
    impls = {r["implementation"] for r in inference}
    assert {"torchvision eager", "torchvision eager channels_last", "resnet_fused auto",
            "resnet_fused triton channels_last", "resnet_fused cpu channels_last"} <= impls
    assert all(r["ms"] > 0 and r["max_err"] < 1e-3 for r in inference), inference
    train = _stage(doc, "train")["rows"]
    assert {r["implementation"] for r in train} >= {"torchvision", "resnet_fused auto memory_efficient"}
    kept = {r["implementation"]: r["memory_MiB"] for r in train}
    assert kept["resnet_fused auto memory_efficient"] < kept["torchvision"]
    layers = _stage(doc, "layers")["rows"]
    convs = {r["layer"] for r in layers}
    assert "conv1" in convs and len(convs) == len(speed.resnet50_layers(1, 32))
    assert all(sum(r["chosen"] == "yes" for r in layers if r["layer"] == name) == 1 for name in convs)
    for name in validate.STAGE_NAMES:
        assert f"## {name}: ok" in md
    assert "| stage | status | checks passed | failed | other rows | seconds |" in md


def test_a_broken_backend_fails_the_run(tmp_path):
    """--self-test-break cpu makes the cpu backend's outputs wrong by 1e-2:
    the run must exit 1 and name exactly those checks."""
    code = validate.main(["--device", "cpu", "--quick", "--out", str(tmp_path), "--stages", "ops",
                          "--self-test-break", "cpu", "--time-limit", TIME_LIMIT, "--stage-limit", STAGE_LIMIT])
    doc, md = _load(str(tmp_path))
    failed = [r for r in _stage(doc, "ops")["rows"] if r["ok"] is False]
    assert code == 1 and doc["exit_code"] == 1
    assert failed and all(r.get("backend") == "cpu" or "path" in r for r in failed)
    assert any(r.get("backend") == "eager" and r["ok"] for r in _stage(doc, "ops")["rows"])
    assert "failures:" in md


def test_time_limit_keeps_the_report(tmp_path):
    """A run cut short by --time-limit still writes its report, marks the
    cut stage and skips the rest, and exits 2 (nothing failed, not done)."""
    # the models stage runs whole networks: far past a 4 s budget on any machine
    code = validate.main(["--device", "cpu", "--quick", "--out", str(tmp_path), "--time-limit", "4",
                          "--stages", "environment", "models", "batch_norm"])
    doc, md = _load(str(tmp_path))
    statuses = [s["status"] for s in doc["stages"]]
    assert code == 2 and doc["exit_code"] == 2
    assert set(statuses) <= {"ok", "timeout", "skipped"} and "ok" not in statuses[-1:]
    assert len(statuses) == 3 and "skipped" in statuses


def test_report_exit_codes_and_markdown(tmp_path):
    r = report.Report(str(tmp_path), {"device": "cpu"})
    ok = {"name": "ops", "status": "ok", "seconds": 1.0, "correctness": True,
          "rows": [{"table": "t", "name": "a", "ok": True, "err": 1e-7, "tol": 1e-5}]}
    r.add(ok)
    assert r.exit_code() == 0
    r.add(dict(ok, name="speed", status="timeout", correctness=False))
    assert r.exit_code() == 2
    r.add(dict(ok, name="models", status="crashed"))
    assert r.exit_code() == 1
    md = open(r.md_path).read()
    assert "1/1 passed" in md and "## speed: timeout" in md


@pytest.mark.parametrize("argv, message", [
    (["--time-limit", "0"], "--time-limit must be positive"),
    (["--jobs", "0"], "--jobs must be at least 1"),
    (["--self-test-break", "auto"], "--self-test-break must name a concrete backend"),
])
def test_bad_arguments_name_the_argument(argv, message):
    with pytest.raises(SystemExit, match=message):
        validate.main(argv)


def test_gpu_loan_script_dry_run(tmp_path):
    """benchmarks/gpu_loan.sh --dry-run: every step but the build, against
    the CPU with tiny limits; its reports land under $OUT."""
    env = dict(os.environ, OUT=str(tmp_path), LOAN_LIMIT="300")
    proc = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu_loan.sh"), "--dry-run"],
                          capture_output=True, text=True, env=env, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    names = set(os.listdir(tmp_path))
    assert {"loan.log", "report.json", "summary.md", "tests.log"} <= names, names
    assert len(names) <= 8  # what a loan brings back: at most 8 files
    assert "skipped (dry run)" in open(tmp_path / "loan.log").read()
    doc = json.load(open(tmp_path / "report.json"))
    assert doc["meta"]["device"] == "cpu" and [s["name"] for s in doc["stages"]] == ["environment", "batch_norm"]
    assert doc["exit_code"] == 0
