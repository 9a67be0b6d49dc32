"""The CUDA train-mode BatchNorm reductions' partition and arithmetic
(csrc/bn_reduce.h), run on the host by resnet_fused._C.bn_reduce_on_host in
the device's thread and merge order.

What a GPU run adds is only the hardware: the plan (vector width, splits,
block shape), which elements each thread reads, the per-pack Chan merges and
the merge tree are the code csrc/cuda/batch_norm_act.cu compiles. (The device
may contract a multiply-add into an FMA, so its last bits can differ from the
host's; the tolerances below allow for that, the exact-sum tests do not need
to.)
"""
import pytest
import torch

from resnet_fused.ops import extension

pytestmark = pytest.mark.skipif(not extension.is_loaded(), reason="resnet_fused._C is not built")

SHAPES = [(2, 64, 7, 7), (3, 5, 14, 14), (1, 3, 28, 28), (4, 16, 1, 1), (2, 8, 3, 5), (5, 24, 4, 4), (1, 32, 56, 56)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
SMS = [1, 8, 132]


def _make(shape, dtype, channels_last, offset=0, gen=None, integers=False):
    """A tensor contiguous in its layout whose data starts `offset` elements
    into an aligned allocation (offset 1: not 16-byte aligned)."""
    n, c, h, w = shape
    numel = n * c * h * w
    if integers:
        flat = torch.randint(-8, 9, (numel + offset,), generator=gen).to(dtype)
    else:
        flat = (torch.randn(numel + offset, generator=gen, dtype=torch.float64) * 3 + 5).to(dtype)
    data = flat[offset:]
    if channels_last:
        return data.view(n, h, w, c).permute(0, 3, 1, 2)
    return data.view(n, c, h, w)


def _stats(x, sms=132, wide=False):
    return extension._C.bn_reduce_on_host(False, x, None, None, None, None, False, sms, wide)


def _grads(g, x, o, mean, invstd, relu, sms=132, wide=False):
    return extension._C.bn_reduce_on_host(True, x, g, o, mean, invstd, relu, sms, wide)


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _expected_vec(shape, dtype, channels_last, aligned):
    v16 = 16 // torch.empty((), dtype=dtype).element_size()
    _, c, h, w = shape
    ok = c % v16 == 0 if channels_last else h * w >= 2 * v16
    return v16 if aligned and ok else 1


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_statistics_match_float64(shape, dtype, channels_last):
    """Mean and biased variance from the plan the GPU would run (16-byte
    packs where the shape allows), for one SM and for an H200's 132 (other
    splits), against float64 statistics of the same stored values."""
    gen = torch.Generator().manual_seed(0)
    x = _make(shape, dtype, channels_last, gen=gen)
    ref = x.double()
    want_mean = ref.mean((0, 2, 3))
    want_var = ref.var((0, 2, 3), unbiased=False)
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    for sms in (1, 132):
        mean, var, plan = _stats(x, sms)
        assert plan["vec"] == _expected_vec(shape, dtype, channels_last, True), plan
        assert mean.dtype == var.dtype == _acc(dtype)
        torch.testing.assert_close(mean.double(), want_mean, rtol=tol, atol=tol * 5)
        torch.testing.assert_close(var.double(), want_var, rtol=tol * 4, atol=tol * 9)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("offset", [0, 1], ids=["aligned", "unaligned"])
def test_every_element_counted_once(shape, dtype, channels_last, offset):
    """Σdz and Σdz·x̂ of small integers are exact in every order, so they must
    equal torch's sums bit for bit whatever the partition: an element missed
    or read twice (a straddling pack counted by both channels, a row past a
    split's end, a lane of a partial channel tile) changes them. Every SM
    count (splits), both index widths, aligned (vector) and unaligned
    (scalar) data."""
    gen = torch.Generator().manual_seed(1)
    g = _make(shape, dtype, channels_last, offset, gen, integers=True)
    x = _make(shape, dtype, channels_last, offset, gen, integers=True)
    o = _make(shape, dtype, channels_last, offset, gen, integers=True)
    c = shape[1]
    acc = _acc(dtype)
    mean, invstd = torch.zeros(c, dtype=acc), torch.ones(c, dtype=acc)
    want_dz = g.double().sum((0, 2, 3))
    want_dzx = (g.double() * x.double()).sum((0, 2, 3))
    masked = torch.where(o.double() <= 0, 0.0, g.double())
    for sms in SMS:
        for wide in (False, True):
            dz, dzx, plan = _grads(g, x, o, mean, invstd, False, sms, wide)
            assert plan["vec"] == _expected_vec(shape, dtype, channels_last, offset == 0), plan
            assert plan["wide_index"] == wide
            assert torch.equal(dz.double(), want_dz), (sms, wide, plan)
            assert torch.equal(dzx.double(), want_dzx), (sms, wide, plan)
            dz, _, _ = _grads(g, x, o, mean, invstd, True, sms, wide)
            assert torch.equal(dz.double(), masked.sum((0, 2, 3))), (sms, wide, plan)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_backward_sums_match_float64(dtype, channels_last):
    """Σdz and Σdz·x̂ with real mean/invstd and the ReLU mask against float64."""
    shape = (3, 16, 14, 14)
    gen = torch.Generator().manual_seed(2)
    g, x, o = (_make(shape, dtype, channels_last, gen=gen) - 5 for _ in range(3))
    g, x, o = (t.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
               for t in (g, x, o))
    mean = x.double().mean((0, 2, 3)).float()
    invstd = x.double().var((0, 2, 3), unbiased=False).add(1e-5).rsqrt().float()
    dz, dzx, plan = _grads(g, x, o, mean, invstd, True)
    assert plan["vec"] == 16 // g.element_size()
    dz_ref = torch.where(o.double() <= 0, 0.0, g.double())
    xhat = (x.double() - mean.double()[None, :, None, None]) * invstd.double()[None, :, None, None]
    torch.testing.assert_close(dz.double(), dz_ref.sum((0, 2, 3)), rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(dzx.double(), (dz_ref * xhat).sum((0, 2, 3)), rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_nonfinite_values_stay_in_their_channel(channels_last):
    """A NaN or inf gives its channel a NaN variance (and NaN/inf mean) as
    torch's statistics do, and never leaks into a neighbour: in NCHW the
    value sits at a plane's first element, inside a pack the previous
    channel's block also reads."""
    shape = (2, 8, 7, 7)
    x = _make(shape, torch.float32, channels_last, gen=torch.Generator().manual_seed(3))
    x[1, 3, 0, 0] = float("nan")
    x[0, 1, 0, 0] = float("inf")
    x[1, 4, 6, 6] = float("-inf")
    mean, var, plan = _stats(x)
    ref = x.double()
    want_mean, want_var = ref.mean((0, 2, 3)), ref.var((0, 2, 3), unbiased=False)
    assert plan["vec"] == 4
    assert torch.equal(mean.isnan(), want_mean.isnan()) and torch.equal(mean.isinf(), want_mean.isinf())
    assert torch.equal(var.isnan(), want_var.isnan()), (var, want_var)
    finite = want_var.isfinite()
    torch.testing.assert_close(var.double()[finite], want_var[finite], rtol=1e-5, atol=1e-5)


def test_plan_spreads_work_without_empty_splits():
    """Splits cover the work exactly (none empty), NCHW blocks are one per
    channel and split, channels_last tiles hold whole 16-byte packs, and a
    large batch gets about 8 blocks per SM."""
    for shape, cl in [((32, 64, 56, 56), False), ((32, 64, 56, 56), True), ((8, 2048, 7, 7), False),
                      ((8, 2048, 7, 7), True), ((1, 3, 5, 5), False)]:
        t = torch.empty(shape).contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)
        t.zero_()
        _, _, p = _stats(t, 132)
        n, c, h, w = shape
        work = n * h * w if cl else n * (((h * w) + p["vec"] - 2) // p["vec"] + 1)
        assert p["splits"] * p["chunk"] >= work > (p["splits"] - 1) * p["chunk"], (shape, p)
        assert p["tx"] * p["ty"] == 256
        if cl:
            assert p["tiles"] * p["tx"] * p["vec"] >= c, p
        else:
            assert p["tiles"] == c and p["ty"] == 1
        if shape == (32, 64, 56, 56):
            assert p["tiles"] * p["splits"] >= 132 * 7, p  # 8 per SM, less the rounding to no empty split


def test_wide_and_narrow_indices_give_the_same_bits():
    x = _make((3, 32, 14, 14), torch.float32, True, gen=torch.Generator().manual_seed(4))
    narrow = _stats(x, 132, False)
    wide = _stats(x, 132, True)
    assert not narrow[2]["wide_index"] and wide[2]["wide_index"]
    assert torch.equal(narrow[0], wide[0]) and torch.equal(narrow[1], wide[1])


def test_bad_arguments():
    with pytest.raises(RuntimeError, match="4-D CPU tensor"):
        _stats(torch.ones(3, 4))
    with pytest.raises(RuntimeError, match="contiguous"):
        _stats(torch.ones(2, 3, 4, 5)[:, :, :, ::2])
    with pytest.raises(TypeError, match="tensors or None"):
        extension._C.bn_reduce_on_host(False, 3, None, None, None, None, False, 1, False)
