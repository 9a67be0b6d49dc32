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


ELEMENTWISE = ("bn_apply", "bn_affine_act", "bn_bwd_apply")
PARTIAL = ("bn_stats_partial", "bn_bwd_partial")


def test_memory_bound_kernels_in_nchw_move_what_the_planes_allow(quick_rows):
    """NCHW (training's layout for an NCHW input) tiles inside one image's
    planes, with L and the strides multiples of VEC elements
    (batch_norm._tiling), compiled at resnet50's 112², 56², 28² (VEC 16),
    14² (VEC 4) and 7² (VEC 1) in fp32, bf16 and fp16: the activations move
    VEC elements per access, up to 16 bytes. So 16 bytes at 56² and 14² in
    fp32, 8 at 14² in bf16/fp16 (a plane of 196 two-byte elements starts
    only 8-byte aligned); at 7² (49 is odd) scalar: every store one element
    and no load wider than the fp32 per-channel parameters'."""
    _, rows = quick_rows
    nchw = [r for r in rows if r["kernel"] in ELEMENTWISE + PARTIAL and "nchw" in r["variant"]]
    assert all(" planes vec" in r["variant"] for r in nchw)
    got = {(r["kernel"], r["variant"].split()[0], r["variant"].split()[-1], r["arch"]) for r in nchw}
    assert got == {(k, d, f"vec{v}", a) for k in ELEMENTWISE + PARTIAL for d in aot.QUICK_NCHW_BN_DTYPES
                   for v in (16, 4, 1) for a in aot.ARCHS}
    layers = {16: ("conv1", "layer1.0.conv3", "layer2.0.conv3"), 4: ("layer3.0.conv3",), 1: ("layer4.0.conv3",)}
    for vec, names in layers.items():
        uses = {u.split()[-1] for r in nchw if r["variant"].endswith(f"vec{vec}") for u in r["uses"]}
        assert uses == set(names), vec
    for r in nchw:
        where = f"{r['kernel']} {r['variant']} sm_{r['arch']}"
        bits = 32 if r["variant"].startswith("fp32") else 16
        vec = int(r["variant"].split()[-1][len("vec"):])
        wide = min(128, vec * bits)
        if vec > 1 and r["kernel"] in ELEMENTWISE:
            assert (r["load_bits"], r["store_bits"]) == (wide, wide), where
        elif vec > 1:
            assert r["load_bits"] == wide, where
        else:
            assert r["load_bits"] <= 32, where
            assert r["kernel"] in PARTIAL or r["store_bits"] == bits, where


def test_models_nchw_batch_norm_launches_are_in_the_report():
    """What the full report (aot.jobs) compiles for the BN kernels in NCHW
    is what resnet50 launches: every layer's forward and backward take the
    plane tiling, with VEC 16, 4 or 1 by its map size (no compile here)."""
    import torch

    from resnet_fused.ops import conv_out_size

    for layer in aot.layers(("resnet50",), 32):
        launches = [kw for _, _, kw in aot.bn_launches(layer, torch.bfloat16, torch.contiguous_format) if "PLANES" in kw]
        side = conv_out_size(layer.x_shape, layer.w_shape, layer.stride, layer.padding, layer.dilation)[3]
        assert len(launches) == 5 and all(kw["PLANES"] for kw in launches), layer.name
        assert {kw["VEC"] for kw in launches} == {1 if side == 7 else 4 if side == 14 else 16}, layer.name
    # aot.jobs binds through the real compiler's JIT functions: not under the interpreter
    code = ("import json; from resnet_fused.ops.triton import aot; print(json.dumps(sorted({(j.kernel, "
            "' '.join(j.variant.split()[1:])) for j in aot.jobs(models=('resnet50',), batches=(32,), archs=(90,))})))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                          env={k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    variants = {tuple(v) for v in json.loads(proc.stdout.splitlines()[-1])}
    for kernel in ELEMENTWISE + PARTIAL:
        assert {(kernel, f"nchw planes vec{v}") for v in (16, 4, 1)} | {(kernel, "nhwc rows")} <= variants


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
