"""The Hopper (TMA) conv_bn_act kernel, ops/triton/conv_tma.py.

Under TRITON_INTERPRET=1 every variant runs on CPU tensors against float64:
odd shapes with partial tiles in every dimension (images, rows, columns,
output channels, the channel block of the reduction), padding at every edge,
stride 2 (the four phase views), dilation, groups, the 1×1 GEMM path, the
residual with a channel offset, ReLU keeping NaN, and a persistent grid
smaller than the tile count. The interpreter runs the descriptors' loads and
stores (zero fill of out-of-bounds boxes included) but not what is specific
to the hardware: warp specialisation (`tl.range(warp_specialize=True)` is a
plain range there), the pipelining stages and the TMA/wgmma lowering. Those
are covered by the ahead-of-time compile for sm_90 at the end of this file
(TMA, wgmma, no spills, shared memory within 227 KB), not by a run.
"""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import resnet_fused
from resnet_fused import ops
from conftest import OP_TOL, assert_equivalent, time_fastest_when_called

conv_tma = pytest.importorskip("resnet_fused.ops.triton.conv_tma")
from resnet_fused.ops.triton import aot, device  # noqa: E402
from resnet_fused.ops.triton.fold import Affine  # noqa: E402

DEVICE = device()

pytestmark = pytest.mark.skipif(
    resnet_fused.backends.reason_unavailable("triton") is not None,
    reason=f"triton backend unavailable: {resnet_fused.backends.reason_unavailable('triton')}",
)


def ref64(x, w, scale, shift, residual, relu, stride, padding, dilation, groups, offset=0):
    y = F.conv2d(x.double(), w.double(), None, stride, padding, dilation, groups)
    y = y * scale.double().view(1, -1, 1, 1) + shift.double().view(1, -1, 1, 1)
    if residual is not None:
        y[:, offset:offset + residual.shape[1]] += residual.double()
    return torch.relu(y) if relu else y


def inputs(n, c, h, w, k, r, stride, padding, dilation, groups, dtype, res_channels=None, res_nhwc=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=g).to(dtype).to(memory_format=torch.channels_last)
    weight = (torch.randn(k, c // groups, r, r, generator=g) / (c // groups * r * r) ** 0.5).to(dtype)
    scale = torch.rand(k, generator=g) + 0.5
    shift = torch.randn(k, generator=g) * 0.3
    conv = dict(stride=(stride,) * 2, padding=(padding,) * 2, dilation=(dilation,) * 2, groups=groups)
    p = (h + 2 * padding - dilation * (r - 1) - 1) // stride + 1
    q = (w + 2 * padding - dilation * (r - 1) - 1) // stride + 1
    residual = torch.randn(n, res_channels or k, p, q, generator=g).to(dtype)
    if res_nhwc:  # read by TMA; NCHW through pointers
        residual = residual.to(memory_format=torch.channels_last)
    return (*(t.to(DEVICE) for t in (x, weight, scale, shift, residual)), conv)


def run(x, w, scale, shift, res, relu, conv, config=conv_tma.INTERPRETER_CONFIG, offset=0, programs=None,
        res_index_64=None):
    shape = ops.conv_out_shape(x, w, conv["stride"], conv["padding"], conv["dilation"])
    out = conv_tma.output_like(x, shape)
    return conv_tma.launch(x, w, Affine.given(scale, shift), res, relu, conv["stride"], conv["padding"], conv["dilation"],
                           conv["groups"], out, config, residual_channel_offset=offset, programs=programs,
                           res_index_64=res_index_64)


# (n, c, h, w, k, r, stride, padding, dilation, groups): no size is a
# multiple of its tile (C = 72: a 64-channel block and a partial one; K = 136:
# a full and a partial 128-channel tile; the M tile of 3×13 output columns
# is 16 columns × 8 rows, P and Q cut it on both sides)
SHAPES = {
    "3x3": (2, 72, 9, 13, 136, 3, 1, 1, 1, 1),
    "3x3_stride2": (2, 72, 11, 10, 40, 3, 2, 1, 1, 1),  # odd H: phase views of unequal height
    "3x3_dilation2": (1, 40, 9, 11, 24, 3, 1, 2, 2, 1),
    "3x3_stride2_dilation2": (1, 16, 12, 9, 24, 3, 2, 2, 2, 1),  # even dilation: one phase holds every tap
    "5x5_pad_asymmetric_taps": (1, 24, 7, 6, 16, 5, 2, 1, 1, 1),
    "groups2": (2, 48, 7, 9, 144, 3, 1, 1, 1, 2),  # 24 channels in, 72 out per group
    "1x1_gemm": (3, 72, 5, 7, 136, 1, 1, 0, 1, 1),  # M = 105
    "1x1_stride2": (2, 72, 9, 7, 40, 1, 2, 0, 1, 1),  # downsample: phase (0, 0) only
    "7x7_many_images": (5, 16, 3, 3, 24, 3, 1, 1, 1, 1),  # P = Q = 3: several images per M tile
    # C/groups a multiple of 64: the weights' 2-D descriptor (W_2D), as in ResNet's layers
    "3x3_c64": (1, 64, 7, 9, 40, 3, 1, 1, 1, 1),
    "3x3_c128_stride2": (2, 128, 9, 8, 24, 3, 2, 1, 1, 1),
    "groups2_c64": (1, 128, 5, 6, 144, 3, 1, 1, 1, 2),  # a group's 128-row weight box runs into the next group
}


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_odd_shapes_against_float64(shape):
    x, w, scale, shift, res, conv = inputs(*shape, torch.float16)
    assert conv_tma.applies(x, w, res, conv["stride"], conv["padding"], conv["dilation"], conv["groups"])
    out = run(x, w, scale, shift, res, True, conv)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert_equivalent(out, ref64(x, w, scale, shift, res, True, **conv), OP_TOL[torch.float16])


@pytest.mark.parametrize("dtype", conv_tma.DTYPES, ids=str)
@pytest.mark.parametrize("relu", [False, True], ids=["no_relu", "relu"])
def test_epilogue_without_residual(dtype, relu):
    x, w, scale, shift, _, conv = inputs(*SHAPES["3x3_stride2"], dtype)
    out = run(x, w, scale, shift, None, relu, conv)
    assert_equivalent(out, ref64(x, w, scale, shift, None, relu, **conv), OP_TOL[dtype])


@pytest.mark.parametrize("res_read", ["tma", "pointers", "pointers_int64"])
@pytest.mark.parametrize("path", ["3x3", "1x1_gemm", "groups2"])
def test_residual_channel_offset(path, res_read):
    """The option-A shortcut: a residual of 16 channels added to output
    channels [24, 40), read in place: by TMA (channels_last; the box's
    out-of-range channels are the zero padding) or through pointers (NCHW),
    with int32 or int64 offsets."""
    x, w, scale, shift, res, conv = inputs(*SHAPES[path], torch.float16, res_channels=16, res_nhwc=res_read == "tma")
    assert conv_tma.residual_tma(res, 24) == (res_read == "tma")
    out = run(x, w, scale, shift, res, True, conv, offset=24, res_index_64=res_read == "pointers_int64")
    assert_equivalent(out, ref64(x, w, scale, shift, res, True, **conv, offset=24), OP_TOL[torch.float16])


@pytest.mark.parametrize("path", ["3x3", "1x1_gemm"])
def test_full_width_residual_through_pointers(path):
    x, w, scale, shift, res, conv = inputs(*SHAPES[path], torch.float16, res_nhwc=False)
    out = run(x, w, scale, shift, res, True, conv)
    assert_equivalent(out, ref64(x, w, scale, shift, res, True, **conv), OP_TOL[torch.float16])


def test_relu_keeps_nan():
    x, w, scale, shift, res, conv = inputs(*SHAPES["1x1_gemm"], torch.float16)
    x[0, :, 0, 0] = float("nan")
    out = run(x, w, scale, shift, res, True, conv)
    assert torch.isnan(out[0, :, 0, 0]).all()
    assert not torch.isnan(out[0, :, 0, 1:]).any() and not torch.isnan(out[1:]).any()


@pytest.mark.parametrize("programs", [1, 3], ids=["one_program", "three_programs"])
def test_persistent_grid_covers_every_tile(programs):
    """Fewer programs than tiles (12 here): each walks its share exactly once."""
    x, w, scale, shift, res, conv = inputs(*SHAPES["3x3"], torch.float16)
    out = run(x, w, scale, shift, res, True, conv, programs=programs)
    assert_equivalent(out, ref64(x, w, scale, shift, res, True, **conv), OP_TOL[torch.float16])


@pytest.mark.parametrize("path", ["3x3", "1x1_gemm", "3x3_stride2"])
@pytest.mark.parametrize("config", conv_tma.CONFIGS_SM90, ids=lambda c: c.name)
def test_every_sm90_tiling(config, path):
    """Each candidate's tile shape, the 256-wide one's epilogue in two halves
    included (K = 136: one half full, one partial; stages mean nothing in
    the interpreter, the AOT test below compiles them)."""
    x, w, scale, shift, res, conv = inputs(*SHAPES[path], torch.bfloat16)
    out = run(x, w, scale, shift, res, True, conv, config=config)
    assert_equivalent(out, ref64(x, w, scale, shift, res, True, **conv), OP_TOL[torch.bfloat16])


def test_m_tile_fills_128_rows():
    cfg = conv_tma.CONFIGS_SM90[0]
    for n, p, q in ((256, 56, 56), (256, 28, 28), (256, 14, 14), (256, 7, 7), (1, 3, 5)):
        bi, bh, bw = conv_tma.m_tile(cfg, n, p, q)
        assert bi * bh * bw == cfg.block_m and bw >= min(q, cfg.block_m)


def test_applies_only_where_tma_can_describe_it():
    x, w, _, _, res, conv = inputs(*SHAPES["3x3"], torch.float16)
    args = (conv["stride"], conv["padding"], conv["dilation"], conv["groups"])
    assert conv_tma.applies(x, w, res, *args)
    assert not conv_tma.applies(x.float(), w.float(), res.float(), *args)  # fp32: the existing kernel
    assert not conv_tma.applies(x.contiguous(), w, res, *args)  # NCHW
    stem_x = torch.empty(1, 3, 16, 16, dtype=torch.float16).to(memory_format=torch.channels_last)
    assert not conv_tma.applies(stem_x, torch.empty(8, 3, 7, 7, dtype=torch.float16), None, (2, 2), (3, 3), (1, 1), 1)
    resnext_x = torch.empty(1, 128, 8, 8, dtype=torch.float16).to(memory_format=torch.channels_last)
    assert not conv_tma.applies(resnext_x, torch.empty(128, 4, 3, 3, dtype=torch.float16), None, (1, 1), (1, 1),
                                (1, 1), 32)
    # ResNeXt's layer4: 32 channels per group, TMA-legal but a mostly empty tile
    wide_x = torch.empty(1, 1024, 8, 8, dtype=torch.float16).to(memory_format=torch.channels_last)
    assert not conv_tma.applies(wide_x, torch.empty(1024, 32, 3, 3, dtype=torch.float16), None, (1, 1), (1, 1),
                                (1, 1), 32)
    assert conv_tma.applies(wide_x, torch.empty(2048, 32, 3, 3, dtype=torch.float16), None, (1, 1), (1, 1),
                            (1, 1), 32)  # 64 per group
    assert not conv_tma.applies(x, w, res, (3, 3), (1, 1), (1, 1), 1)


def test_packed_weight_cached_per_version():
    w = torch.randn(16, 8, 3, 3, dtype=torch.float16)
    first = conv_tma.packed_weight(w)
    assert conv_tma.packed_weight(w) is first
    assert torch.equal(first, w.permute(0, 2, 3, 1).reshape(16, -1).view(16, 3, 3, 8))
    with torch.no_grad():
        w.mul_(2)  # bumps _version
    second = conv_tma.packed_weight(w)
    assert second is not first and torch.equal(second, w.permute(0, 2, 3, 1))


def test_candidates_only_on_sm90(monkeypatch):
    """No candidate off sm_90 (here: CPU tensors); on sm_90 every tiling,
    each launcher computing the op (the device check patched, the kernel
    interpreted)."""
    x, w, scale, shift, res, conv = inputs(*SHAPES["1x1_stride2"], torch.float16)
    args = (x, w, Affine.given(scale, shift), res, True, *conv.values())
    assert conv_tma.candidates(*args) == {}
    monkeypatch.setattr(conv_tma, "is_sm90", lambda device: True)
    cands = conv_tma.candidates(*args)
    assert set(cands) == set(conv_tma.CONFIGS_SM90)
    ref = ref64(x, w, scale, shift, res, True, **conv)
    for launcher in cands.values():
        assert_equivalent(launcher(), ref, OP_TOL[torch.float16])
    fp32 = (x.float(), w.float(), Affine.given(scale, shift), res.float(), True, *conv.values())
    assert conv_tma.candidates(*fp32) == {}


def test_tuner_takes_it_when_fastest(monkeypatch):
    """library.triton_conv_bn_act offers the sm_90 tilings to the tuner,
    which checks each one's result and caches the fastest: with the device
    check patched to sm_90, measuring patched on (CPU tensors are never
    timed) and the Hopper launches made to time fastest, a TmaConfig is
    cached for the key and the op's result comes from this kernel."""
    from resnet_fused.ops.triton import tuning

    launches = []
    launch = conv_tma.launch

    def counted(*args, **kwargs):
        launches.append(args[10])
        return launch(*args, **kwargs)

    monkeypatch.setattr(conv_tma, "is_sm90", lambda device: True)
    monkeypatch.setattr(conv_tma, "launch", counted)
    time_fastest_when_called(monkeypatch, launches)  # the TMA kernel times fastest
    monkeypatch.setattr(tuning, "_choices", {})
    x, w, scale, shift, res, conv = inputs(*SHAPES["1x1_stride2"], torch.float16)
    with resnet_fused.backend("triton"):
        out = ops.conv_bn_act(x, w, scale, shift, res, True, **conv)
    assert_equivalent(out, ref64(x, w, scale, shift, res, True, **conv), OP_TOL[torch.float16])
    (choice,) = tuning.choices().values()
    assert isinstance(choice, conv_tma.TmaConfig)
    assert set(launches) == set(conv_tma.CONFIGS_SM90) and launches[-1] == choice  # all tried, the chosen ran last


# ---- ahead-of-time compilation for sm_90 ----------------------------------------------


@pytest.fixture(scope="module")
def sm90_rows(tmp_path_factory):
    out = tmp_path_factory.mktemp("aot_tma") / "aot.json"
    proc = subprocess.run(
        [sys.executable, "-m", "resnet_fused.ops.triton.aot", "--tma", "--quick", "--json", str(out)],
        capture_output=True, text=True, timeout=900,
        env={k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"},  # the real compiler
    )
    return proc, json.loads(out.read_text()) if out.exists() else []


def test_sm90_variants_use_tma_and_wgmma(sm90_rows):
    """Every launched variant of the Hopper kernel compiles for sm_90 with TMA
    loads (cp.async.bulk.tensor), wgmma, no spills and shared memory within
    the SM's 227 KB; every candidate tiling and both kernel paths (GEMM, conv
    with stride 1 and 2) are among them."""
    proc, rows = sm90_rows
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-5000:]
    rows = [r for r in rows if r["kernel"] == "conv_tma"]
    assert rows and {r["arch"] for r in rows} == {90}
    for r in rows:
        where = r["variant"]
        assert r["error"] is None, where
        assert r["tma"], where
        assert r["mma"] == "wgmma", where
        assert r["spill_bytes"] == 0, where
        assert 0 < r["shared_bytes"] <= aot.SMEM_LIMIT[90], where
    assert {r["variant"].split()[0] for r in rows} == {c.name for c in conv_tma.CONFIGS_SM90}
    # the models' epilogue (BN folded in the kernel) on the tilings offered for it
    folded = conv_tma.configs_for(Affine.batch_norm(*[torch.ones(1)] * 4, 1e-5))
    assert {r["variant"].split()[0] for r in rows if r["variant"].endswith(" bn")} == {c.name for c in folded}
    assert {r["variant"].split()[2] for r in rows} >= {"gemm", "s1", "s2"}
