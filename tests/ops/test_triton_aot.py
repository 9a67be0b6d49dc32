"""Ahead-of-time compilation of the Triton kernels for sm_80 and sm_90, no
GPU needed: the variants the launcher really produces for ResNet's layers
(Triton's launch-time specialisation included), on a representative subset
(`python -m resnet_fused.ops.triton.aot` compiles them all)."""
import json
import os
import subprocess
import sys

import pytest

import resnet_fused

triton_conv = pytest.importorskip("resnet_fused.ops.triton.conv")
from resnet_fused.ops.triton import aot, batch_norm  # noqa: E402

pytestmark = pytest.mark.skipif(
    resnet_fused.backends.reason_unavailable("triton") is not None,
    reason=f"triton backend unavailable: {resnet_fused.backends.reason_unavailable('triton')}",
)


@pytest.fixture(scope="module")
def quick_rows(tmp_path_factory):
    out = tmp_path_factory.mktemp("aot") / "aot.json"
    proc = subprocess.run(
        [sys.executable, "-m", "resnet_fused.ops.triton.aot", "--quick", "--json", str(out)],
        capture_output=True, text=True, timeout=600,
        env={k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"},  # the real compiler
    )
    return proc, json.loads(out.read_text()) if out.exists() else []


def test_ahead_of_time_compilation_sm80_sm90(quick_rows):
    """Every compiled variant: no spills, shared memory within the SM limit,
    tensor cores where the GEMM has them (wgmma on sm_90 where the tile
    allows), and the table says so (exit status 0)."""
    proc, rows = quick_rows
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-5000:]
    assert rows and {r["arch"] for r in rows} == {80, 90}
    for r in rows:
        where = f"{r['kernel']} {r['variant']} sm_{r['arch']}"
        assert r["error"] is None, where
        assert r["spill_bytes"] == 0, where
        assert 0 <= r["shared_bytes"] <= aot.SMEM_LIMIT[r["arch"]], where
        assert r["ok"], where
    gemm = [r for r in rows if r["needs_mma"]]
    assert all(r["mma"] for r in gemm)
    assert {r["mma"] for r in gemm if r["arch"] == 90} >= {"wgmma"}
    assert {r["mma"] for r in gemm if r["arch"] == 80} == {"mma"}
    assert any(r["cp_async"] for r in gemm if "nhwc" in r["variant"])


def test_variants_are_the_launched_ones(quick_rows):
    """The specialisation of a real launch, not a generic i32 variant: in
    channels_last the channel strides launch as the constant 1, sizes divisible
    by 16 are marked so; every tiling the tuner may pick is there, and the
    fp32 `ieee` variant the tests run, in both layouts."""
    _, rows = quick_rows
    conv = [r for r in rows if r["kernel"] == "conv_bn_act"]
    for r in conv:
        if "nhwc" in r["variant"]:
            assert {"sx_c", "sw_c", "sy_c"} <= set(r["ones"]), r["variant"]
        assert "sx_n" not in r["not_divisible_by_16"], r["variant"]  # C·H·W, a multiple of 16 in every layer
    for arch in aot.ARCHS:
        tilings = {r["variant"].split()[0] for r in conv if r["arch"] == arch and " fp16 nhwc cblk" in r["variant"]}
        assert tilings == {cfg.name for cfg in triton_conv.CONFIGS + triton_conv.CHANNELS_LAST_CONFIGS}
        for layout in aot.LAYOUTS:
            assert any(f"fp32-ieee {layout}" in r["variant"] and r["arch"] == arch for r in conv)
    assert {r["kernel"] for r in rows} == {"conv_bn_act", *(f"bn_{k}" for k in batch_norm.KERNELS)}


def test_memory_bound_kernels_move_16_bytes_per_access_in_channels_last(quick_rows):
    """The BN and epilogue kernels in channels_last (the layout inference
    runs in: plan.Plan.channels_last) load their activations with 16-byte
    vector loads, and the element-wise ones store 16 bytes too: read from
    each variant's PTX (`widest_access`). The per-channel partial-sum
    kernels store one fp32 per channel, the final ones read those."""
    _, rows = quick_rows
    bn = [r for r in rows if r["kernel"].startswith("bn_") and "nhwc" in r["variant"]]
    assert {r["kernel"] for r in bn} >= {"bn_apply", "bn_affine_act", "bn_bwd_apply", "bn_stats_partial"}
    for r in bn:
        where = f"{r['kernel']} {r['variant']} sm_{r['arch']}"
        if r["kernel"] in ("bn_apply", "bn_affine_act", "bn_bwd_apply"):
            assert (r["load_bits"], r["store_bits"]) == (128, 128), where
        elif r["kernel"] in ("bn_stats_partial", "bn_bwd_partial"):
            assert r["load_bits"] == 128, where


def test_widest_access_reads_ptx():
    ptx = ("ld.global.v4.b32 {%r1, %r2, %r3, %r4}, [%rd1];\n ld.global.b16 %rs1, [%rd2];\n"
           "st.global.v2.b16 [%rd3], {%rs1, %rs2};\n @%p1 ld.global.L1::evict_last.v2.b64 {%rd4, %rd5}, [%rd6];")
    assert aot.widest_access(ptx, "ld") == 128
    assert aot.widest_access(ptx, "st") == 32
    assert aot.widest_access("ld.shared.v4.b32 {}, [x];", "ld") == 0


def test_channels_last_only_tilings_never_launch_in_nchw():
    """CHANNELS_LAST_CONFIGS spilled with NCHW's strided channel loads: the
    launcher offers them to channels_last layers only (no compile here)."""
    import torch

    layer = next(lay for lay in aot.layers(("resnet50",), 1) if lay.name == "layer2.0.conv2")
    names = {name: {cfg.name for cfg, *_ in aot.conv_launches(layer, torch.float16, fmt)}
             for name, fmt in aot.LAYOUTS.items()}
    assert names["nchw"] == {cfg.name for cfg in triton_conv.CONFIGS}
    assert names["nhwc"] == {cfg.name for cfg in triton_conv.CONFIGS + triton_conv.CHANNELS_LAST_CONFIGS}
