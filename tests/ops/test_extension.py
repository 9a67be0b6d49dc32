"""resnet_fused._C: the build itself and the scale_shift_add_relu_ CPU kernel.

The CPU kernel calls the same csrc/epilogue.h arithmetic the CUDA kernel
compiles, so these tests pin the GPU's per-element math too.
"""
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from resnet_fused.ops import extension
from conftest import OP_TOL, assert_equivalent, rel_err

op = torch.ops.resnet_fused.scale_shift_add_relu_ if extension.is_loaded() else None


def test_extension_is_built_and_loads():
    # An installed package must carry its compiled library; a silent
    # eager-only install would hide a broken build.
    assert extension.is_loaded(), f"resnet_fused._C failed to load: {extension.load_error}"
    assert extension.has_kernel("scale_shift_add_relu_", "CPU")


def _cuobjdump():
    candidates = [shutil.which("cuobjdump")]
    for root in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if root:
            candidates.append(os.path.join(root, "bin", "cuobjdump"))
    try:
        import triton

        candidates.append(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump"))
    except ImportError:
        pass
    return next((c for c in candidates if c and os.path.exists(c)), None)


def test_cuda_build_contains_sm80_and_sm90():
    if not extension.has_kernel("scale_shift_add_relu_", "CUDA"):
        pytest.skip(f"built without CUDA kernels: {extension.unavailable_reason('CUDA')}")
    tool = _cuobjdump()
    if tool is None:
        pytest.skip("cuobjdump not found (CUDA toolkit or triton's bundled copy)")
    lib = extension._C.__file__
    elf = subprocess.run([tool, "--list-elf", lib], capture_output=True, text=True, check=True).stdout
    ptx = subprocess.run([tool, "--list-ptx", lib], capture_output=True, text=True, check=True).stdout
    assert "sm_80" in elf and "sm_90" in elf, elf
    assert "sm_90" in ptx, ptx  # "+PTX": JIT-able on GPUs newer than Hopper


def _sass_functions(lib: str) -> dict:
    """{(arch, mangled name): SASS text} of a library's device code."""
    tool = _cuobjdump()
    if tool is None:
        pytest.skip("cuobjdump not found (CUDA toolkit or triton's bundled copy)")
    text = subprocess.run([tool, "-sass", lib], capture_output=True, text=True, check=True, timeout=300).stdout
    functions = {}
    for section in re.split(r"\n(?=arch = sm_)", text):
        arch = re.match(r"arch = (sm_\d+)", section)
        parts = re.split(r"\n\s*Function : (\S+)\n", section)
        for name, body in zip(parts[1::2], parts[2::2]):
            key = (arch.group(1) if arch else "?", name)
            functions[key] = functions.get(key, "") + body
    return functions


def test_cuda_epilogue_loads_and_stores_16_bytes():
    """The compiled CUDA epilogue (scale_shift_add_act_kernel, behind the
    cuda backend's conv_bn_act and its train-mode BN) moves 16 bytes per
    load and store in every vector instantiation (VEC > 1: each dtype, both
    layouts, with and without residual) on sm_80 and sm_90, and the scalar
    ones do not: what the launcher's choice of path buys. Read from the
    SASS of the built library; no GPU needed."""
    if not extension.has_kernel("scale_shift_add_relu_", "CUDA"):
        pytest.skip(f"built without CUDA kernels: {extension.unavailable_reason('CUDA')}")
    functions = _sass_functions(extension._C.__file__)
    kernels = {k: v for k, v in functions.items()
               if "scale_shift_add_act_kernel" in k[1] or "bn_eval_epilogue_kernel" in k[1]}
    assert {arch for arch, _ in kernels} >= {"sm_80", "sm_90"}, sorted({a for a, _ in functions})
    vectors = folding = 0
    for (arch, name), sass in kernels.items():
        vec = int(re.search(r"Li(\d+)E", name).group(1))
        wide = "LDG.E.128" in sass and "STG.E.128" in sass
        assert wide == (vec > 1), (arch, name)
        vectors += vec > 1
        folding += vec > 1 and "bn_eval_epilogue_kernel" in name
    assert vectors >= 2 * 4 * 4  # two archs × (bf16, fp16, fp32, fp64) × layouts × residual
    assert folding >= 2 * 4 * 4  # bn_eval_add_relu_'s one-launch kernel, the same variants


def test_cuda_train_bn_kernels_move_16_bytes_and_divide_in_32_bits():
    """The train-mode BN kernels (csrc/cuda/batch_norm_act.cu): both
    reductions (statistics forward, Σdz/Σdz·x̂ backward; csrc/bn_reduce.h's
    partition, checked on the host in test_bn_reduce.py) load 16 bytes per
    access in every vector instantiation, NCHW and channels_last; the dx
    pass loads and stores 16 bytes. The 32-bit-index instantiations of the
    element-wise kernels (dx and the epilogue: what every tensor under 2^31
    elements runs) have no 64-bit division (its I2F.U64 divisor
    conversion); the 64-bit ones keep it for the tensors that need it. From the SASS of the
    built library, sm_80 and sm_90; no GPU needed."""
    if not extension.has_kernel("batch_norm_act_fwd", "CUDA"):
        pytest.skip(f"built without CUDA kernels: {extension.unavailable_reason('CUDA')}")
    functions = _sass_functions(extension._C.__file__)
    seen = {"reduce_nchw_kernel": 0, "reduce_nhwc_kernel": 0, "bn_act_backward_kernel": 0}
    narrow_elementwise = 0
    for (arch, name), sass in functions.items():
        kind = next((k for k in seen if k in name), None)
        if kind is not None:
            vec, index = re.search(r"Li(\d+)E(?:Lb[01]E)?([il])EEv", name).groups()
            wide_load = "LDG.E.128" in sass
            assert wide_load == (int(vec) > 1), (arch, name)
            if kind == "bn_act_backward_kernel":
                assert ("STG.E.128" in sass) == (int(vec) > 1), (arch, name)
            seen[kind] += int(vec) > 1
        if kind == "bn_act_backward_kernel" or "scale_shift_add_act_kernel" in name or "bn_eval_epilogue_kernel" in name:
            # the 64-bit division sequence converts its divisor with I2F.U64
            wide_division = "I2F.U64" in sass
            assert wide_division == (re.search(r"E([il])EEv", name).group(1) == "l"), (arch, name)
            narrow_elementwise += not wide_division
    # two archs × 4 dtypes × (Stats, Grads) × 2 index types; dx: × 2 layouts
    assert seen["reduce_nchw_kernel"] >= 2 * 4 * 2 * 2 and seen["reduce_nhwc_kernel"] >= 2 * 4 * 2 * 2, seen
    assert seen["bn_act_backward_kernel"] >= 2 * 4 * 2 * 2, seen
    assert narrow_elementwise >= 2 * 4 * 2 * 2, narrow_elementwise


def test_cuda_bn_fold_kernel_rounds_every_step():
    """bn_eval_add_relu_'s CUDA fold kernel (csrc/epilogue.h bn_scale_shift
    with the _rn intrinsics) is compiled for sm_80 and sm_90 with IEEE
    division and square root (the FCHK range check of the correctly rounded
    sequences, not MUFU's approximation alone), as the CPU build computes
    (test_bn_eval_add_relu_is_the_epilogue_of_the_folded_bn_bitwise). Its
    bits on a GPU are unmeasured here."""
    if not extension.has_kernel("bn_eval_add_relu_", "CUDA"):
        pytest.skip(f"built without CUDA kernels: {extension.unavailable_reason('CUDA')}")
    functions = _sass_functions(extension._C.__file__)
    # the one-launch kernel (fold into shared memory, then the epilogue) and
    # the fold kernel of layers wider than its shared memory
    folds = [(arch, name) for (arch, name) in functions if "bn_fold_kernel" in name or "bn_eval_epilogue_kernel" in name]
    assert {arch for arch, _ in folds} >= {"sm_80", "sm_90"}, folds
    assert any("bn_eval_epilogue_kernel" in name for _, name in folds)
    for arch, name in folds:
        assert "FCHK" in functions[arch, name] and "MUFU.RSQ" in functions[arch, name], (arch, name)


def test_import_without_extension_warns_once_and_eager_serves():
    code = (
        "import sys, warnings\n"
        "sys.modules['resnet_fused._C'] = None\n"  # makes `from resnet_fused import _C` fail
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    import resnet_fused, torch\n"
        "    m = resnet_fused.resnet18().eval()\n"
        "    out = m(torch.randn(1, 3, 32, 32))\n"
        "msgs = [str(w.message) for w in caught if 'resnet_fused._C' in str(w.message)]\n"
        "assert len(msgs) == 1, msgs\n"
        "avail = resnet_fused.available_backends()\n"
        "assert 'eager' in avail and 'cpu' not in avail and 'cuda' not in avail, avail\n"
        "assert out.shape == (1, 1000)\n"
        "print('OK', msgs[0])\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "OK" in result.stdout and "the 'cpu' and 'cuda' backends are unavailable" in result.stdout


pytestmark_ext = pytest.mark.skipif(op is None, reason="resnet_fused._C not loaded (see test_extension_is_built_and_loads)")


def reference64(y, scale, shift, residual, relu):
    out = y.double() * scale.double().view(1, -1, 1, 1) + shift.double().view(1, -1, 1, 1)
    if residual is not None:
        out = out + residual.double()
    return torch.relu(out) if relu else out


SHAPES = [(2, 64, 7, 7), (2, 3, 5, 6), (1, 13, 1, 1), (3, 130, 3, 5), (2, 7, 4, 4), (1, 256, 2, 2), (1, 3, 7, 7)]
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


@pytestmark_ext
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("epilogue", ["relu", "residual_relu", "residual", "none"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_scale_shift_add_relu_matches_float64(shape, epilogue, memory_format, dtype):
    g = torch.Generator().manual_seed(0)
    y = (torch.randn(*shape, generator=g) * 3).to(dtype).to(memory_format=memory_format)
    scale = torch.rand(shape[1], generator=g) + 0.5
    shift = torch.randn(shape[1], generator=g)
    res = None
    if epilogue.startswith("residual"):
        res = torch.randn(*shape, generator=g).to(dtype).to(memory_format=memory_format)
    relu = epilogue.endswith("relu")
    ref = reference64(y, scale, shift, res, relu)
    ptr = y.data_ptr()
    out = extension.scale_shift_add_relu_(y, scale, shift, res, relu)
    assert out.data_ptr() == ptr and y.data_ptr() == ptr  # in place
    assert y.is_contiguous(memory_format=memory_format)
    assert_equivalent(y, ref, OP_TOL[dtype])


@pytestmark_ext
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
def test_bit_identical_to_eager_fp32(memory_format):
    g = torch.Generator().manual_seed(1)
    y = torch.randn(2, 37, 6, 5, generator=g).to(memory_format=memory_format)
    scale, shift = torch.rand(37, generator=g), torch.randn(37, generator=g)
    res = torch.randn(y.shape, generator=g).to(memory_format=memory_format)
    eager = torch.relu(y * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1) + res)
    extension.scale_shift_add_relu_(y, scale, shift, res, True)
    assert torch.equal(y, eager)


@pytestmark_ext
def test_residual_in_other_layout_and_residual_is_y():
    g = torch.Generator().manual_seed(2)
    y = torch.randn(2, 8, 5, 5, generator=g).to(memory_format=torch.channels_last)
    scale, shift = torch.rand(8, generator=g), torch.randn(8, generator=g)
    res = torch.randn(2, 8, 5, 5, generator=g)  # NCHW residual for a channels_last y
    ref = reference64(y, scale, shift, res, True)
    extension.scale_shift_add_relu_(y, scale, shift, res, True)
    assert_equivalent(y, ref, OP_TOL[torch.float32])
    # residual aliasing the output buffer: y = relu(y*s + b + y)
    y2 = torch.randn(2, 8, 5, 5, generator=g)
    ref2 = reference64(y2, scale, shift, y2.clone(), True)
    extension.scale_shift_add_relu_(y2, scale, shift, y2, True)
    assert_equivalent(y2, ref2, OP_TOL[torch.float32])


@pytestmark_ext
def test_nan_propagates_through_relu():
    y = torch.zeros(1, 2, 2, 2)
    y[0, 1, 1, 1] = float("nan")
    extension.scale_shift_add_relu_(y, torch.ones(2), torch.zeros(2), None, True)
    assert torch.isnan(y[0, 1, 1, 1]) and torch.count_nonzero(torch.isnan(y)) == 1


@pytestmark_ext
def test_empty_tensor():
    y = torch.empty(0, 4, 3, 3)
    extension.scale_shift_add_relu_(y, torch.ones(4), torch.zeros(4), None, True)
    assert y.shape == (0, 4, 3, 3)


@pytestmark_ext
@pytest.mark.parametrize(
    "make, pattern",
    [
        (lambda y, s, b: (y[0], s, b, None), "y must be a 4-D"),
        (lambda y, s, b: (y.long(), s, b, None), "y must be floating point"),
        (lambda y, s, b: (y, s[:3], b, None), "scale must be a 1-D tensor of length C=4"),
        (lambda y, s, b: (y, s, b.double(), None), "shift must be float32"),
        (lambda y, s, b: (y, s, b.to("meta"), None), "shift is on meta but y is on cpu"),
        (lambda y, s, b: (y.transpose(2, 3), s, b, None), "y must be contiguous in NCHW or channels_last"),
        (lambda y, s, b: (y, s, b, y[:, :, :2]), "residual must have the shape of y"),
        (lambda y, s, b: (y, s, b, y.double()), "residual must have the dtype of y"),
        (lambda y, s, b: (y, s, b, y.view(-1).roll(1).view_as(y)), None),  # a copy: fine
        (lambda y, s, b: (y[:, :, :, :3], s, b, None), "y must be contiguous"),
    ],
)
def test_bad_arguments(make, pattern):
    y = torch.randn(2, 4, 3, 6)
    args = make(y, torch.ones(4), torch.zeros(4))
    if pattern is None:
        extension.scale_shift_add_relu_(*args, True)
        return
    with pytest.raises(RuntimeError, match=pattern):
        extension.scale_shift_add_relu_(*args, True)


@pytestmark_ext
def test_partial_overlap_is_rejected():
    storage = torch.randn(2 * 4 * 3 * 3 + 1)
    y = storage[:-1].view(2, 4, 3, 3)
    res = storage[1:].view(2, 4, 3, 3)
    with pytest.raises(RuntimeError, match="residual partially overlaps y"):
        extension.scale_shift_add_relu_(y, torch.ones(4), torch.zeros(4), res, True)


@pytestmark_ext
@pytest.mark.parametrize("with_residual", [True, False])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
def test_opcheck(with_residual, memory_format):
    y = torch.randn(2, 5, 3, 4).to(memory_format=memory_format)
    res = torch.randn(2, 5, 3, 4) if with_residual else None
    torch.library.opcheck(op.default, (y, torch.rand(5), torch.randn(5), res, True))


def _bn_tensors(c, seed=0, gamma=True, beta=True, conv_bias=False):
    g = torch.Generator().manual_seed(seed)
    return dict(
        weight=torch.rand(c, generator=g) + 0.5 if gamma else None,
        bias=torch.randn(c, generator=g) if beta else None,
        running_mean=torch.randn(c, generator=g),
        running_var=torch.rand(c, generator=g) + 0.1,
        conv_bias=torch.randn(c, generator=g) if conv_bias else None,
    )


BN_VARIANTS = {"gamma_beta": {}, "affine_false": dict(gamma=False, beta=False), "conv_bias": dict(conv_bias=True)}


@pytestmark_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("variant", list(BN_VARIANTS))
def test_bn_eval_add_relu_is_the_epilogue_of_the_folded_bn_bitwise(variant, memory_format, dtype):
    """bn_eval_add_relu_ folds the BN in C++ (csrc/epilogue.h bn_scale_shift)
    with the bits of ops/fold.py's torch formula: the same output as
    scale_shift_add_relu_ given that formula's vectors, NaN/inf in the BN
    tensors included (one channel each)."""
    from resnet_fused.ops import fold

    bn = _bn_tensors(6, **BN_VARIANTS[variant])
    bn["running_var"][0] = float("nan")
    bn["running_var"][1] = -1e-5  # var + eps = 0: an infinite scale
    bn["running_mean"][2] = float("inf")
    y = (torch.randn(2, 6, 5, 7, generator=torch.Generator().manual_seed(1)) * 3).to(dtype)
    y = y.contiguous(memory_format=memory_format)
    res = torch.randn(2, 6, 5, 7, generator=torch.Generator().manual_seed(2)).to(dtype)
    scale, shift = fold.scale_shift(bn["weight"], bn["bias"], bn["running_mean"], bn["running_var"], 1e-5,
                                    bn["conv_bias"])
    for residual, relu in ((res, True), (None, False)):
        want = extension.scale_shift_add_relu_(y.clone(), scale, shift, residual, relu)
        got = extension.bn_eval_add_relu_(y.clone(), bn["weight"], bn["bias"], bn["running_mean"],
                                          bn["running_var"], 1e-5, bn["conv_bias"], residual, relu)
        assert got.is_contiguous(memory_format=memory_format)
        assert torch.equal(torch.isnan(got), torch.isnan(want))
        assert torch.equal(got.nan_to_num(), want.nan_to_num())


@pytestmark_ext
def test_bn_eval_add_relu_bad_arguments_and_opcheck():
    bn = _bn_tensors(5, conv_bias=True)
    y = torch.randn(2, 5, 3, 4)
    args = lambda **kw: {**dict(y=y.clone(), eps=1e-5, residual=None, relu=True), **bn, **kw}  # noqa: E731
    with pytest.raises(RuntimeError, match=r"conv_bias must be a 1-D tensor of length C=5"):
        extension.bn_eval_add_relu_(**args(conv_bias=torch.zeros(4)))
    with pytest.raises(RuntimeError, match=r"running_var must be float32"):
        extension.bn_eval_add_relu_(**args(running_var=bn["running_var"].double()))
    with pytest.raises(RuntimeError, match=r"eps must be non-negative"):
        extension.bn_eval_add_relu_(**args(eps=-1.0))
    with pytest.raises(RuntimeError, match=r"y must be a 4-D"):
        extension.bn_eval_add_relu_(**args(y=torch.randn(2, 5)))
    for res in (None, torch.randn(2, 5, 3, 4)):
        torch.library.opcheck(torch.ops.resnet_fused.bn_eval_add_relu_.default,
                              (y.clone(), bn["weight"], bn["bias"], bn["running_mean"], bn["running_var"], 1e-5,
                               bn["conv_bias"], res, True))


@pytestmark_ext
def test_cpu_composed_path_issues_two_ops_per_pair(monkeypatch):
    """Where the cpu backend's module op declines a layer (here: every
    layer), a pair is the convolution and bn_eval_add_relu_, the BN folded
    in C++: no torch op computes its scale and shift."""
    import torchvision

    import resnet_fused
    from conftest import OpCounter

    monkeypatch.setitem(resnet_fused.backends.registered("cpu").ops, "conv_bn_act_module", lambda *args: None)
    torch.manual_seed(0)
    tv = torchvision.models.resnet18().eval()
    fused = resnet_fused.fuse(tv).eval()
    fused.fc.register_forward_hook(lambda *args: None)  # a hook: the per-layer path, not the owned stages
    x = torch.randn(1, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), resnet_fused.backend("cpu"):
        want = tv(x)
        with OpCounter() as counter:
            got = fused(x)
    assert_equivalent(got, want, 1e-4)
    assert counter.ops["resnet_fused.bn_eval_add_relu_.default"] == 20
    assert counter.ops["aten.convolution.default"] == 20
    assert not any(name.startswith(("aten.rsqrt", "aten.neg")) for name in counter.ops), dict(counter.ops)


@pytestmark_ext
def test_thread_count_independent():
    g = torch.Generator().manual_seed(3)
    base = torch.randn(4, 64, 33, 33, generator=g)
    scale, shift = torch.rand(64, generator=g), torch.randn(64, generator=g)
    threads = torch.get_num_threads()
    outs = []
    try:
        for n in (1, max(2, threads)):
            torch.set_num_threads(n)
            y = base.clone()
            extension.scale_shift_add_relu_(y, scale, shift, base, True)
            outs.append(y)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(outs[0], outs[1])


# ---- batch_norm_act_fwd / batch_norm_act_bwd --------------------------------


def _bn_inputs(memory_format=torch.contiguous_format, dtype=torch.float32, residual=True):
    g = torch.Generator().manual_seed(11)
    x = (torch.randn(3, 7, 4, 5, generator=g) + 0.5).to(dtype).to(memory_format=memory_format)
    w, b = torch.rand(7, generator=g) + 0.5, torch.randn(7, generator=g)
    r = torch.randn(3, 7, 4, 5, generator=g).to(dtype).to(memory_format=memory_format) if residual else None
    return x, w, b, r


@pytestmark_ext
@pytest.mark.parametrize("with_residual", [True, False])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
def test_opcheck_batch_norm_act(with_residual, memory_format):
    x, w, b, r = _bn_inputs(memory_format, residual=with_residual)
    x.requires_grad_()
    w.requires_grad_()
    b.requires_grad_()
    if r is not None:
        r.requires_grad_()
    torch.library.opcheck(torch.ops.resnet_fused.batch_norm_act_fwd.default, (x, w, b, 1e-5, r, True))
    out, mean, invstd, _ = torch.ops.resnet_fused.batch_norm_act_fwd(x.detach(), w, b, 1e-5, r, True)
    grad = torch.randn_like(out)
    torch.library.opcheck(
        torch.ops.resnet_fused.batch_norm_act_bwd.default,
        (grad, x.detach(), out.detach(), w.detach(), mean, invstd, True, with_residual),
    )


@pytestmark_ext
def test_batch_norm_act_statistics_are_stable():
    """Mean 100, spread 0.1: E[x²] − E[x]² in fp32 loses the variance to
    rounding (ulp(1e4) ≈ 1e-3 against var = 0.01); two-pass statistics keep
    it. The output bound is what an fp32 mean allows: ulp(100)/0.1 ≈ 1e-4."""
    g = torch.Generator().manual_seed(12)
    x = 100.0 + 0.1 * torch.randn(4, 3, 16, 16, generator=g)
    naive = (x * x).mean((0, 2, 3)) - x.mean((0, 2, 3)) ** 2
    out, mean, invstd, var = torch.ops.resnet_fused.batch_norm_act_fwd(x, None, None, 0.0, None, False)
    ref_var = x.double().var(dim=(0, 2, 3), unbiased=False)
    assert rel_err(naive, ref_var) > 1e-2  # the problem is real at this scale
    assert_equivalent(var, ref_var, 1e-6, "variance")
    ref = (x.double() - x.double().mean((0, 2, 3), keepdim=True)) / ref_var.sqrt().view(1, -1, 1, 1)
    assert_equivalent(out, ref, 1e-3)


@pytestmark_ext
@pytest.mark.parametrize(
    "make, pattern",
    [
        (lambda x, w, b, r: (x[0], w, b, r), "batch_norm_act: x must be a 4-D"),
        (lambda x, w, b, r: (x.long(), w, b, None), "batch_norm_act: x must be floating point"),
        (lambda x, w, b, r: (x, w[:3], b, r), "weight must be a 1-D tensor of length C=7"),
        (lambda x, w, b, r: (x, w, b.view(7, 1), r), "bias must be a 1-D tensor of length C=7"),
        (lambda x, w, b, r: (x, w, b, r[:, :3]), "residual must have the shape of x"),
        (lambda x, w, b, r: (x, w, b, r.double()), "residual must have the dtype of x"),
        (lambda x, w, b, r: (x[:1, :, :1, :1], w, b, None), "expected more than 1 value per channel"),
    ],
)
def test_batch_norm_act_bad_arguments(make, pattern):
    args = make(*_bn_inputs())
    with pytest.raises(RuntimeError, match=pattern):
        torch.ops.resnet_fused.batch_norm_act_fwd(args[0], args[1], args[2], 1e-5, args[3], True)


@pytestmark_ext
def test_batch_norm_act_residual_aliasing_input():
    """The residual may be x itself (the functional op never writes its inputs)."""
    x, w, b, _ = _bn_inputs()
    x_before = x.clone()
    out, *_ = torch.ops.resnet_fused.batch_norm_act_fwd(x, w, b, 1e-5, x, True)
    mean = x.double().mean((0, 2, 3), keepdim=True)
    var = x.double().var((0, 2, 3), unbiased=False, keepdim=True)
    ref = torch.relu((x.double() - mean) / (var + 1e-5).sqrt() * w.double().view(1, -1, 1, 1) + b.double().view(1, -1, 1, 1) + x.double())
    assert torch.equal(x, x_before)
    assert_equivalent(out, ref, OP_TOL[torch.float32])


@pytestmark_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("y_format", [torch.contiguous_format, torch.channels_last], ids=["y_nchw", "y_nhwc"])
@pytest.mark.parametrize("x_format", [torch.contiguous_format, torch.channels_last], ids=["x_nchw", "x_nhwc"])
@pytest.mark.parametrize("offset", [0, 3, 6])
def test_narrow_strided_residual_is_read_in_place(offset, x_format, y_format, dtype):
    """The option-A shortcut: a stride-2 view of the block input with fewer
    channels, added to channels [offset, offset + C_r): equal to adding the
    zero-padded copy, without making it."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(3, 6, 10, 9, generator=g).to(dtype).to(memory_format=x_format)
    view = x[:, :, ::2, ::2]
    y = torch.randn(3, 12, 5, 5, generator=g).to(dtype).to(memory_format=y_format)
    scale, shift = torch.rand(12, generator=g) + 0.5, torch.randn(12, generator=g)
    padded = torch.nn.functional.pad(view, (0, 0, 0, 0, offset, 12 - 6 - offset))
    for relu in (True, False):
        got, want = y.clone(), y.clone()
        extension.scale_shift_add_relu_(got, scale, shift, view, relu, offset)
        extension.scale_shift_add_relu_(want, scale, shift, padded.contiguous(memory_format=y_format), relu)
        assert torch.equal(got, want)  # same per-element arithmetic, bit for bit
        assert got.is_contiguous(memory_format=y_format)
        assert_equivalent(got, reference64(y, scale, shift, padded, relu).to(dtype), OP_TOL[dtype])


@pytestmark_ext
def test_narrow_residual_bad_offsets():
    y = torch.randn(2, 8, 3, 3)
    res = torch.randn(2, 4, 3, 3)
    with pytest.raises(RuntimeError, match="residual must have the shape of y"):  # no offset: must match y
        extension.scale_shift_add_relu_(y, torch.ones(8), torch.zeros(8), res, True)
    for offset in (-2, 5):
        with pytest.raises(RuntimeError, match=f"residual_channel_offset \\+ C_r <= C; got .* residual_channel_offset={offset}"):
            extension.scale_shift_add_relu_(y, torch.ones(8), torch.zeros(8), res, True, offset)
    with pytest.raises(RuntimeError, match="residual must have the shape of y"):
        extension.scale_shift_add_relu_(y, torch.ones(8), torch.zeros(8), torch.randn(2, 4, 3, 2), True, 2)
    # a strided view into y itself would be read while y is written
    with pytest.raises(RuntimeError, match="residual partially overlaps y"):
        extension.scale_shift_add_relu_(y, torch.ones(8), torch.zeros(8), y[:, :4], True, 4)


@pytestmark_ext
def test_opcheck_narrow_residual():
    y = torch.randn(2, 8, 3, 4).to(memory_format=torch.channels_last)
    x = torch.randn(2, 4, 6, 8)
    torch.library.opcheck(op.default, (y, torch.rand(8), torch.randn(8), x[:, :, ::2, ::2], True, 2))


@pytestmark_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("offset", [0, 2, 5])
def test_batch_norm_act_narrow_strided_residual(offset, fmt, dtype):
    """Train-mode kernels with the option-A shortcut read in place: the same
    output as with the padded residual, and grad_residual = the padded
    gradient's channels [offset, offset + C_r)."""
    g = torch.Generator().manual_seed(11)
    x = torch.randn(3, 9, 5, 4, generator=g).to(dtype).to(memory_format=fmt)
    block_in = torch.randn(3, 4, 10, 8, generator=g).to(dtype).to(memory_format=fmt)
    view = block_in[:, :, ::2, ::2]
    padded = torch.nn.functional.pad(view, (0, 0, 0, 0, offset, 9 - 4 - offset)).contiguous(memory_format=fmt)
    w, b = torch.rand(9, generator=g) + 0.5, torch.randn(9, generator=g)
    if dtype == torch.float64:
        w, b = w.double(), b.double()
    fwd = torch.ops.resnet_fused.batch_norm_act_fwd
    got = fwd(x, w, b, 1e-5, view, True, offset)
    want = fwd(x, w, b, 1e-5, padded, True)
    for a, c in zip(got, want):
        assert torch.equal(a, c)
    grad = torch.randn(x.shape, generator=g).to(dtype)
    bwd = torch.ops.resnet_fused.batch_norm_act_bwd
    out, mean, invstd, _ = want
    narrow = bwd(grad, x, out, w, mean, invstd, True, True, 4, offset)
    full = bwd(grad, x, out, w, mean, invstd, True, True)
    for a, c in zip(narrow[:3], full[:3]):
        assert torch.equal(a, c)
    assert narrow[3].shape == (3, 4, 5, 4) and narrow[3].is_contiguous(memory_format=fmt)
    assert torch.equal(narrow[3], full[3][:, offset:offset + 4])


@pytestmark_ext
def test_batch_norm_act_narrow_residual_opcheck_and_errors():
    x = torch.randn(2, 8, 3, 3)
    r = torch.randn(2, 4, 6, 6)[:, :, ::2, ::2]
    torch.library.opcheck(torch.ops.resnet_fused.batch_norm_act_fwd.default,
                          (x.clone().requires_grad_(), torch.rand(8), torch.randn(8), 1e-5, r.clone().requires_grad_(),
                           True, 2))
    out, mean, invstd, _ = torch.ops.resnet_fused.batch_norm_act_fwd(x, None, None, 1e-5, r, True, 2)
    torch.library.opcheck(torch.ops.resnet_fused.batch_norm_act_bwd.default,
                          (torch.randn_like(x), x, out, None, mean, invstd, True, True, 4, 2))
    with pytest.raises(RuntimeError, match="residual_channel_offset \\+ C_r <= C; got .* residual_channel_offset=5"):
        torch.ops.resnet_fused.batch_norm_act_fwd(x, None, None, 1e-5, r, True, 5)
    with pytest.raises(RuntimeError, match="residual_channel_offset \\+ residual_channels must be within"):
        torch.ops.resnet_fused.batch_norm_act_bwd(torch.randn_like(x), x, out, None, mean, invstd, True, True, 4, 6)


# ---- build, threads, autograd of the C++ ops ---------------------------------


@pytestmark_ext
def test_build_info_openmp_and_cpu_targets():
    # at::parallel_for is compiled into _C: without -fopenmp it silently runs
    # on one thread (the CPU kernels did, until this test existed)
    info = extension.build_info()
    if torch.backends.openmp.is_available():
        assert info["openmp"] is True, info
    assert info["cpu_targets"].split(",")[-1] == "default", info


@pytestmark_ext
def test_same_values_compares_dtype_shape_device_and_bits():
    # the oneDNN weight cache's per-call check of the BN vectors (ops/cpu/onednn.py)
    # and its fallback without _C (torch.equal: NaN never matches there)
    from resnet_fused.ops.cpu import onednn

    same = extension._C.same_values
    a = torch.tensor([1.0, 2.0, -0.0, 3.0])
    for check in (same, onednn._same_values_py):
        assert check((a, None), (a.clone(), None))
        assert not check((a[[0, 2, 3]],), (a[[0, 2, 3]] + 1e-7,))
        assert not check((a,), (a.double(),))
        assert not check((a,), (a.view(2, 2),))
        assert not check((a, None), (a, a))
        assert not check((None,), (a,))
    nan = torch.tensor([float("nan"), 1.0])
    assert same((nan,), (nan.clone(),))  # bitwise: NaN is itself, so no repacking each call
    assert not same((a,), (a.abs(),))  # -0.0 and 0.0 differ in bits
    strided = torch.arange(8.0)[::2]
    assert same((strided,), (torch.tensor([0.0, 2.0, 4.0, 6.0]),))
    assert not same((strided,), (torch.tensor([0.0, 2.0, 4.0, 7.0]),))
    assert not same((a,), (a, a))
    assert same((torch.empty(0),), (torch.empty(0),))
    with pytest.raises(TypeError, match="only tensors or None"):
        same((a,), (1.0,))


@pytestmark_ext
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
def test_batch_norm_act_thread_count_independent(memory_format):
    # big enough that every pass splits across threads (fwd statistics, apply,
    # bwd sums and dx), bitwise equal whatever the thread count
    g = torch.Generator().manual_seed(5)
    x = torch.randn(4, 48, 37, 29, generator=g).to(memory_format=memory_format)
    r = torch.randn(4, 48, 37, 29, generator=g).to(memory_format=memory_format)
    w, b = torch.rand(48, generator=g) + 0.5, torch.randn(48, generator=g)
    grad = torch.randn(4, 48, 37, 29, generator=g).to(memory_format=memory_format)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            out, mean, invstd, var = torch.ops.resnet_fused.batch_norm_act_fwd(x, w, b, 1e-5, r, True)
            grads = torch.ops.resnet_fused.batch_norm_act_bwd(grad, x, out, w, mean, invstd, True, True)
            results.append((out, mean, invstd, var, *grads))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b_ in zip(results[0], other):
            assert torch.equal(a, b_)


def _bn_act_float64(x, w, b, r, relu, eps=1e-5):
    mean = x.mean((0, 2, 3), keepdim=True)
    var = x.var((0, 2, 3), unbiased=False, keepdim=True)
    y = (x - mean) / torch.sqrt(var + eps)
    if w is not None:
        y = y * w[None, :, None, None]
    if b is not None:
        y = y + b[None, :, None, None]
    if r is not None:
        y = y + r
    return torch.relu(y) if relu else y


_OPTIONAL_INPUT_CASES = [
    (has_weight, has_bias, has_residual, grad_of)
    for has_weight in (True, False)
    for has_bias in (True, False)
    for has_residual in (True, False)
    for grad_of, present in (
        ("all", True), ("x", True), ("weight", has_weight), ("bias", has_bias), ("residual", has_residual)
    )
    if present
]


@pytestmark_ext
@pytest.mark.parametrize("has_weight,has_bias,has_residual,grad_of", _OPTIONAL_INPUT_CASES)
def test_batch_norm_act_autograd_any_optional_inputs(has_weight, has_bias, has_residual, grad_of):
    # The C++ autograd (csrc/autograd.cpp) maps gradients onto whichever
    # optional inputs are present and asked for; float64 against autograd of
    # the composite.
    g = torch.Generator().manual_seed(9)
    x = torch.randn(3, 6, 5, 4, generator=g, dtype=torch.float64)
    w = torch.rand(6, generator=g, dtype=torch.float64) + 0.5 if has_weight else None
    b = torch.randn(6, generator=g, dtype=torch.float64) if has_bias else None
    r = torch.randn(3, 6, 5, 4, generator=g, dtype=torch.float64) if has_residual else None
    inputs = {"x": x, "weight": w, "bias": b, "residual": r}
    wanted = [k for k, t in inputs.items() if t is not None and grad_of in ("all", k)]
    for k in wanted:
        inputs[k].requires_grad_(True)
    out = torch.ops.resnet_fused.batch_norm_act_fwd(x, w, b, 1e-5, r, True)[0]
    ref = _bn_act_float64(x, w, b, r, True)
    torch.testing.assert_close(out, ref)
    dy = torch.randn(out.shape, generator=g, dtype=torch.float64)
    got = torch.autograd.grad(out, [inputs[k] for k in wanted], dy)
    want = torch.autograd.grad(ref, [inputs[k] for k in wanted], dy)
    for k, a, e in zip(wanted, got, want):
        torch.testing.assert_close(a, e, msg=lambda m: f"grad of {k}: {m}")
