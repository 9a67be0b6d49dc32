"""`python -m resnet_fused.bench` and the traffic model behind --traffic."""
import json

import pytest
import torch
import torchvision
from torchvision.models.resnet import BasicBlock, Bottleneck

from resnet_fused import bench, traffic


def test_traffic_of_a_basic_block_by_hand():
    """resnet18's layer1.0 (64 channels, 56x56, batch 1, bf16), counted by hand."""
    block = BasicBlock(64, 64)
    counted = traffic.count_module(block, (1, 64, 56, 56), torch.bfloat16)
    act = 64 * 56 * 56 * 2  # one activation tensor, bytes
    w = 64 * 64 * 3 * 3 * 2  # one 3x3 weight
    flops = 2 * (64 * 56 * 56) * 64 * 9  # one convolution
    eager, fused = counted["torchvision"], counted["resnet_fused"]
    # conv1: conv (x, w -> y), bn (y -> y, 4 fp32 vectors), relu (y -> y)
    # conv2: conv, bn, add (y, identity -> y), relu
    assert [k.op for k in eager.kernels] == ["conv", "bn", "relu", "conv", "bn", "add", "relu"]
    assert eager.bytes == 2 * (act + w + act) + 2 * (2 * act + 4 * 64 * 4) + 2 * (2 * act) + 3 * act
    assert eager.launches == 7
    # fused: each pair reads x, w and the BN's 4 vectors (folded in the
    # kernel), writes y once; conv2 also reads the identity
    assert [k.op for k in fused.kernels] == ["conv_bn_act", "conv_bn_act"]
    assert fused.bytes == 2 * (act + w + 4 * 64 * 4 + act) + act
    assert eager.flops == fused.flops == 2 * flops
    # roofline floor on an H100: each kernel at its own roof
    h100 = traffic.GPUS["H100"]
    expected = sum(max(k.bytes / 3.35e12, k.flops / 989e12) for k in fused.kernels)
    assert traffic.floor_seconds(fused, h100, torch.bfloat16) == pytest.approx(expected)


def test_traffic_of_a_bottleneck_with_projection():
    block = Bottleneck(256, 128, stride=2, downsample=torch.nn.Sequential(
        torch.nn.Conv2d(256, 512, 1, stride=2, bias=False), torch.nn.BatchNorm2d(512)))
    counted = traffic.count_module(block, (2, 256, 28, 28), torch.float16)
    eager, fused = counted["torchvision"], counted["resnet_fused"]
    # three pairs with ReLU, the last with the add; the projection: conv + bn only
    assert [k.op for k in eager.kernels].count("relu") == 3 and [k.op for k in eager.kernels].count("add") == 1
    assert eager.launches == 3 * 3 + 1 + 2 and fused.launches == 4
    out = 2 * 512 * 14 * 14 * 2
    residual_reads = [k for k in fused.kernels if k.layer == "conv3"]
    proj = [k for k in fused.kernels if k.layer == "downsample.0"][0]
    assert proj.bytes == 2 * 256 * 28 * 28 * 2 + 512 * 256 * 2 + 4 * 512 * 4 + out
    assert residual_reads[0].bytes == 2 * 128 * 14 * 14 * 2 + 512 * 128 * 2 + 4 * 512 * 4 + out + out


def test_traffic_of_whole_models():
    for arch in ("resnet18", "resnet50", "resnext50_32x4d"):
        counted = traffic.count(arch, 8, torch.bfloat16)
        tv, fused = counted["torchvision"], counted["resnet_fused"]
        convs = sum(isinstance(m, torch.nn.Conv2d) for m in getattr(torchvision.models, arch)().modules())
        assert fused.launches == convs + 3  # + maxpool, avgpool, fc
        assert tv.bytes > 2 * fused.bytes
        assert tv.flops == fused.flops
    # resnet50's well-known 4.1 GMAC per 224x224 image
    assert traffic.count("resnet50", 1, torch.bfloat16)["resnet_fused"].flops == pytest.approx(8.2e9, rel=0.01)


def test_traffic_command(tmp_path, capsys):
    out = tmp_path / "t.json"
    assert bench.main(["--traffic", "--model", "resnet18", "--batch", "1", "4", "--gpu", "H100", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "not a measurement" in text and "H100 floor ms" in text
    data = json.loads(out.read_text())
    assert data["kind"] == "traffic model" and len(data["results"]) == 4
    assert data["results"][0]["launches"] == 68 and data["results"][1]["launches"] == 23


@pytest.mark.parametrize("train", [False, True], ids=["inference", "train"])
def test_bench_command_measures_and_checks(tmp_path, capsys, train):
    out = tmp_path / "b.json"
    argv = ["--model", "resnet18", "--batch", "2", "--size", "32", "--rounds", "2", "--backend", "auto", "eager",
            "--json", str(out)] + (["--train"] if train else [])
    assert bench.main(argv) == 0
    captured = capsys.readouterr()
    assert "round 2/2" in captured.err  # progress on stderr
    data = json.loads(out.read_text())
    assert data["kind"] == "measurement" and data["train"] is train
    rows = data["results"]
    names = [r["implementation"] for r in rows]
    assert names == ["torchvision", "torchvision-channels_last", "resnet_fused", "resnet_fused-channels_last",
                     "resnet_fused-eager", "resnet_fused-eager-channels_last"]
    assert rows[0]["speedup_vs_torchvision"] == 1.0 and rows[0]["error_vs_torchvision"] == 0.0
    for r in rows:
        assert r["images_per_s"] > 0 and len(r["times_s"]) == 2
        assert r["per_round_vs_compile"] is None  # no --compile rows to compare with
        assert r["error_vs_torchvision"] <= 1e-4, r
        assert r["implementation"] in captured.out
    if train:
        saved = {r["implementation"]: r["saved_activation_bytes"] for r in rows}
        assert saved["resnet_fused"] == saved["torchvision"] > 0  # see docs/performance.md, "What training saves"


def test_per_round_ratio_compares_within_rounds():
    # the host slows down 3x in round 2: within each round the second is 2x faster
    assert bench.per_round_ratio([1.0, 3.0, 1.2], [0.5, 1.5, 0.6]) == 2.0
    assert bench.per_round_ratio([1.0, 1.0, 4.0], [1.0, 2.0, 1.0]) == 1.0  # ratios 1, 0.5, 4
    with pytest.raises(ValueError, match="same length"):
        bench.per_round_ratio([1.0], [1.0, 2.0])


def test_bench_bad_arguments():
    with pytest.raises(SystemExit, match="--rounds must be at least 1"):
        bench.main(["--rounds", "0"])
    with pytest.raises(SystemExit, match="--batch sizes must be positive"):
        bench.main(["--batch", "0"])
    with pytest.raises(SystemExit):
        bench.main(["--model", "vgg16"])  # argparse names the choices


def test_plot_needs_matplotlib_or_says_so(tmp_path, monkeypatch):
    rows = [{"model": "resnet18", "batch": b, "implementation": "x", "images_per_s": 10.0 * b} for b in (1, 2)]
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        with pytest.raises(SystemExit, match="--plot needs matplotlib"):
            bench._plot(rows, str(tmp_path / "p.png"))
        return
    bench._plot(rows, str(tmp_path / "p.png"))
    assert (tmp_path / "p.png").stat().st_size > 1000
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)
    with pytest.raises(SystemExit, match="--plot needs matplotlib"):
        bench._plot(rows, str(tmp_path / "q.png"))


def test_bench_several_dtypes_in_one_run(tmp_path):
    out = tmp_path / "d.json"
    assert bench.main(["--model", "resnet18", "--batch", "2", "--size", "32", "--rounds", "1",
                       "--dtype", "float32", "bfloat16", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["dtypes"] == ["float32", "bfloat16"]
    # the CPU named as the results files name it: model, ISA features, torch's dispatch level
    assert data["cpu"].endswith(f"torch capability {torch.backends.cpu.get_cpu_capability()}")
    rows = {r["implementation"]: r for r in data["results"]}
    assert set(rows) == {"torchvision", "torchvision-channels_last", "resnet_fused", "resnet_fused-channels_last",
                         "torchvision bfloat16", "torchvision-channels_last bfloat16", "resnet_fused bfloat16",
                         "resnet_fused-channels_last bfloat16"}
    assert rows["resnet_fused bfloat16"]["dtype"] == "bfloat16"
    # bf16 rows are checked against torchvision's fp32 output: within bf16 accuracy
    assert 0 < rows["resnet_fused-channels_last bfloat16"]["error_vs_torchvision"] <= 5e-2
    assert rows["resnet_fused"]["error_vs_torchvision"] <= 1e-4


def test_bench_mixed_batch_sizes_row(tmp_path):
    """--mixed: one row per implementation serving the sizes in turn, checked
    against torchvision on the concatenated outputs."""
    out = tmp_path / "m.json"
    assert bench.main(["--model", "resnet18", "--batch", "1", "3", "--size", "32", "--rounds", "2", "--mixed",
                       "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["results"]
    assert [r["batch"] for r in rows] == [1] * 4 + [3] * 4 + ["1+3"] * 4
    for r in rows:
        assert r["error_vs_torchvision"] <= 1e-4, r
    mixed = [r for r in rows if r["batch"] == "1+3"]
    assert all(r["images_per_s"] == pytest.approx(4 / r["median_s"]) for r in mixed)
    with pytest.raises(SystemExit, match="--mixed times inference only"):
        bench.main(["--mixed", "--train", "--batch", "1", "2"])


@pytest.mark.parametrize("engine", ["onnxruntime", "openvino"])
def test_bench_peer_engines(tmp_path, engine):
    from resnet_fused import peers

    if peers.unavailable(engine):
        pytest.skip(f"{engine}: {peers.unavailable(engine)}")
    out = tmp_path / "p.json"
    assert bench.main(["--model", "resnet18", "--batch", "2", "--size", "32", "--rounds", "1", "--peers", engine,
                       "--json", str(out)]) == 0
    rows = {r["implementation"]: r for r in json.loads(out.read_text())["results"]}
    assert 0 < rows[engine]["error_vs_torchvision"] <= 1e-4  # a different implementation, fp32
    with pytest.raises(SystemExit, match="--peers: the engines are timed for CPU inference only"):
        bench.main(["--peers", engine, "--train"])


def test_bench_peer_rows_per_dtype(tmp_path, capsys):
    """--dtype float32 bfloat16 --peers: OpenVINO gets a bf16 row where the
    CPU has bf16 inference (its precision checked after compiling, so a silent
    f32 fallback is refused); onnxruntime has none and the run says why."""
    from resnet_fused import peers

    for engine in peers.NAMES:
        if peers.unavailable(engine):
            pytest.skip(f"{engine}: {peers.unavailable(engine)}")
    out = tmp_path / "p.json"
    assert bench.main(["--model", "resnet18", "--batch", "2", "--size", "32", "--rounds", "1",
                       "--dtype", "float32", "bfloat16", "--peers", *peers.NAMES, "--json", str(out)]) == 0
    rows = {r["implementation"]: r for r in json.loads(out.read_text())["results"]}
    err = capsys.readouterr().err
    assert "onnxruntime bfloat16" not in rows
    assert "no onnxruntime bfloat16 row: onnxruntime's CPU provider computes convolutions in fp32 only" in err
    assert rows["openvino"]["error_vs_torchvision"] <= 1e-4  # the fp32 row stays fp32
    if "openvino bfloat16" in rows:
        row = rows["openvino bfloat16"]
        assert row["dtype"] == "bfloat16" and 0 < row["error_vs_torchvision"] <= 5e-2
    else:  # no BF16 capability, or OpenVINO compiled for f32 anyway (ONEDNN_MAX_CPU_ISA=AVX2): said, not timed
        assert "no openvino bfloat16 row: OpenVINO: " in err


def test_bench_builds_compiled_and_engine_rows_per_dtype():
    """Implementations with a `remake` (torch.compile, the engines) are built
    for each dtype they do not already have, even the first one; one that
    cannot compute in a dtype is left out."""
    made = []

    def remake(dtype):
        made.append(dtype)
        return "no fp16 here" if dtype == torch.float16 else ("model in", dtype)

    plain = bench._Impl("plain", torch.nn.Identity(), None, torch.contiguous_format)
    built = bench._Impl("built", ("model in", torch.float32), None, torch.contiguous_format, remake=remake)
    out = bench._with_dtypes([plain, built], [torch.bfloat16, torch.float32, torch.float16])
    assert made == [torch.bfloat16, torch.float16]
    assert [(i.name, i.dtype) for i in out] == [
        ("plain", torch.bfloat16), ("built", torch.bfloat16), ("plain float32", torch.float32),
        ("built float32", torch.float32), ("plain float16", torch.float16)]
    assert out[1].model == ("model in", torch.bfloat16) and out[3].model is built.model


def test_rounds_pause_then_time_the_second_of_two_calls_in_a_row():
    """Each round pauses before every implementation (the previous one's
    spinning threads stop), runs it twice and times the second call."""
    calls, now = [], [0.0]

    def run_of(name, seconds):
        def run():
            calls.append(name)
            now[0] += seconds[len([c for c in calls if c == name]) - 1]
        return run

    a = bench._Impl("a", None, None, torch.contiguous_format)
    b = bench._Impl("b", None, None, torch.contiguous_format)
    runs = [run_of("a", [9.0, 1.0, 9.0, 2.0]), run_of("b", [9.0, 3.0, 9.0, 4.0])]
    bench._time_rounds([a, b], runs, 2, clock=lambda: now[0], sleep=lambda s: calls.append(("pause", s)))
    pause = ("pause", bench.SETTLE_S)
    assert calls == [pause, "a", "a", pause, "b", "b"] * 2
    assert a.times == [1.0, 2.0] and b.times == [3.0, 4.0]
    assert bench.SETTLE_S >= 0.05  # onnxruntime's workers spin ~50 ms after a run


def test_peers_reject_unknown_names_and_say_what_is_missing(monkeypatch):
    from resnet_fused import peers

    with pytest.raises(ValueError, match="name must be one of onnxruntime, openvino; got 'tensorrt'"):
        peers.unavailable("tensorrt")
    monkeypatch.setattr(peers, "_importable", lambda m: m != "openvino")
    assert peers.unavailable("openvino") == "not installed: pip install openvino"
    with pytest.raises(RuntimeError, match="openvino: not installed"):
        peers.Engine("openvino", b"", 1)
    monkeypatch.setattr(peers, "_importable", lambda m: True)
    assert peers.unavailable("onnxruntime", torch.float16) == \
        "onnxruntime's CPU provider computes convolutions in fp32 only, not float16"
    assert peers.unavailable("openvino", torch.float64) == "OpenVINO has no float64 inference precision"
