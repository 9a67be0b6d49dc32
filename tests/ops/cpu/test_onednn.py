"""The cpu backend's oneDNN inference path: BN folded into pre-packed weights,
residual and ReLU as post-ops (resnet_fused.ops.cpu.onednn)."""
import copy

import pytest
import torch
import torchvision

import resnet_fused
from resnet_fused.ops import extension
from resnet_fused.ops.cpu import onednn
from conftest import NET_TOL, assert_equivalent, randomize_norms
from test_models import ARCHS

pytestmark = pytest.mark.skipif(
    onednn.UNAVAILABLE is not None or resnet_fused.backends.reason_unavailable("cpu") is not None,
    reason=f"oneDNN path unavailable: {onednn.UNAVAILABLE or resnet_fused.backends.reason_unavailable('cpu')}",
)
FORMATS = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}


def pair(arch, **kwargs):
    torch.manual_seed(0)
    tv = randomize_norms(getattr(torchvision.models, arch)(**kwargs)).eval()
    return tv, resnet_fused.fuse(tv).eval()


def packed_convs(model):
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    return sum(1 for c in convs if onednn.cached(c))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("arch", ARCHS)
def test_every_architecture_takes_the_onednn_path(arch, fmt):
    tv, fused = pair(arch)
    x = torch.randn(1, 3, 57, 75, generator=torch.Generator().manual_seed(1)).to(memory_format=FORMATS[fmt])
    tv, fused = tv.to(memory_format=FORMATS[fmt]), fused.to(memory_format=FORMATS[fmt])
    with torch.no_grad():
        out, ref = fused(x), tv(x)
    assert packed_convs(fused) == sum(isinstance(m, torch.nn.Conv2d) for m in fused.modules())
    assert_equivalent(out, ref, NET_TOL[torch.float32])
    with torch.no_grad():  # activations keep the input's layout
        assert fused.layer1(torch.randn(1, fused.layer1[0].conv1.in_channels, 9, 9).to(
            memory_format=FORMATS[fmt])).is_contiguous(memory_format=FORMATS[fmt])


@pytest.mark.parametrize("how", ["autocast", "model.to(bfloat16)"])
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("arch", ARCHS)
def test_bfloat16(arch, fmt, how):
    """bf16 compute with fp32 accumulation, every architecture, batch 1 at an
    odd size: within 1e-2 of the fp32 reference."""
    tv, fused = pair(arch)
    x = torch.randn(1, 3, 57, 75, generator=torch.Generator().manual_seed(2)).to(memory_format=FORMATS[fmt])
    fused = fused.to(memory_format=FORMATS[fmt])
    with torch.no_grad():
        ref = tv(x)
        if how == "autocast":
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = fused(x)
        else:
            out = fused.to(torch.bfloat16)(x.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16
    assert packed_convs(fused) > 0
    assert_equivalent(out.float(), ref, NET_TOL[torch.bfloat16])


def test_in_place_edits_and_load_state_dict_invalidate_the_cache():
    tv, fused = pair("resnet18")
    x = torch.randn(2, 3, 48, 48)

    def check():
        with torch.no_grad():
            assert_equivalent(fused(x), tv(x), NET_TOL[torch.float32])

    check()
    packed = onednn.cached(fused.layer1[0].conv1)[-1]
    for model in (tv, fused):  # the same in-place edits on both
        with torch.no_grad():
            model.layer1[0].conv1.weight.mul_(1.5)
            model.layer2[0].bn1.running_var.mul_(3.0)
            model.layer3[1].bn2.bias.add_(0.25)
            model.bn1.eps = 0.1
    check()
    assert onednn.cached(fused.layer1[0].conv1)[-1] is not packed  # re-packed
    other = pair("resnet18")[0]
    randomize_norms(other, seed=9)
    tv.load_state_dict(other.state_dict())
    fused.load_state_dict(other.state_dict())
    check()
    # an optimizer step on the weights (BN-in-eval fine-tuning)
    opt = torch.optim.SGD(fused.parameters(), lr=0.1)
    opt_tv = torch.optim.SGD(tv.parameters(), lr=0.1)
    for model, o in ((tv, opt_tv), (fused, opt)):
        model(x).sum().backward()  # grad recording: the differentiable path, not oneDNN
        o.step()
    check()
    # unchanged modules keep their packed weights
    packed = onednn.cached(fused.layer4[1].conv2)[-1]
    check()
    assert onednn.cached(fused.layer4[1].conv2)[-1] is packed


def test_results_do_not_depend_on_the_thread_count():
    _, fused = pair("resnet50")
    x = torch.randn(3, 3, 64, 64).to(memory_format=torch.channels_last)
    threads = torch.get_num_threads()
    outs = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            with torch.no_grad():
                outs.append(fused(x))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


def test_gradients_still_flow_in_eval_mode():
    """With a gradient being recorded the differentiable path runs (and the
    cache is not consulted): BN-in-eval fine-tuning works as before."""
    tv, fused = pair("resnet18")
    x = torch.randn(2, 3, 32, 32)
    tv(x).square().mean().backward()
    fused(x).square().mean().backward()
    for (name, p), q in zip(tv.named_parameters(), fused.parameters()):
        assert_equivalent(q.grad, p.grad, 1e-4, name)


def test_bad_inputs_give_the_same_errors_as_other_backends():
    _, fused = pair("resnet18")
    for backend in ("auto", "eager"):
        with resnet_fused.backend(backend), torch.no_grad():
            with pytest.raises(ValueError, match="x has 4 channels but weight expects 3"):
                fused(torch.randn(1, 4, 32, 32))
            with pytest.raises(ValueError, match="x must be a 4-D"):
                fused.layer1(torch.randn(64, 8, 8))


def test_other_backends_and_training_do_not_use_it():
    _, fused = pair("resnet18")
    onednn.clear_cache()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), resnet_fused.backend("eager"):
        fused(x)
    fused.train()(x)
    assert packed_convs(fused) == 0
    with torch.no_grad():
        fused.eval()(x)
    assert packed_convs(fused) == 20


def test_deepcopy_and_pickle_after_use():
    import io
    import pickle

    _, fused = pair("resnet18")
    with torch.no_grad():
        fused(torch.randn(1, 3, 32, 32))
    copy.deepcopy(fused)
    pickle.loads(pickle.dumps(fused))
    buf = io.BytesIO()
    torch.save(fused, buf)


def test_hooked_activations_are_never_overwritten():
    """Without hooks the blocks add the residual into the identity's buffer;
    a forward hook that keeps a block's output must see it unchanged after
    the next block ran."""
    tv, fused = pair("resnet18")
    x = torch.randn(2, 3, 64, 64)
    kept = {}
    for name, model in (("tv", tv), ("fused", fused)):
        model.layer1[0].register_forward_hook(lambda m, i, o, name=name: kept.__setitem__(name, o))
        with torch.no_grad():
            out = model(x)
        kept[name + "_out"] = out
    assert_equivalent(kept["fused"], kept["tv"], NET_TOL[torch.float32])
    assert_equivalent(kept["fused_out"], kept["tv_out"], NET_TOL[torch.float32])


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_owned_path_order_gives_the_same_bits(arch):
    """With no hooks, projection blocks run their shortcut convolution last
    and add it into the main path's buffer (inductor's order); a hook anywhere
    switches to the module-by-module path (shortcut first, main path adds it).
    Same two rounded operands, one rounding: the outputs agree bit for bit."""
    _, fused = pair(arch)
    x = torch.randn(2, 3, 48, 40)
    with torch.no_grad():
        owned = fused(x)
        handle = fused.avgpool.register_forward_hook(lambda m, i, o: None)
        try:
            x_cl = x.contiguous(memory_format=torch.channels_last)
            p = resnet_fused.plan.decide(x_cl, fused)
            assert p.hooks
            assert not fused._owns_activations(x_cl, (fused.layer1, fused.layer2, fused.layer3, fused.layer4), p)
            modular = fused(x)
        finally:
            handle.remove()
    assert torch.equal(owned, modular)


def test_input_is_never_modified():
    _, fused = pair("resnet18")
    for fmt in FORMATS.values():
        x = torch.randn(2, 3, 64, 64).to(memory_format=fmt)
        before = x.clone()
        with torch.no_grad():
            fused(x)
            fused.layer1(torch.relu(torch.randn(2, 64, 16, 16)).to(memory_format=fmt))
        assert torch.equal(x, before)


def test_edits_through_data():
    """BN edits through `.data` are seen (values compared every call); a conv
    weight edited through `.data` keeps no version count, so it needs
    clear_cache() — the one documented exception."""
    tv, fused = pair("resnet18")
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        fused(x)
        for model in (tv, fused):
            model.layer2[1].bn1.weight.data.mul_(1.7)
            model.bn1.running_mean.data.add_(0.3)
        assert_equivalent(fused(x), tv(x), NET_TOL[torch.float32])
        for model in (tv, fused):
            model.layer1[0].conv1.weight.data.mul_(2.0)
        stale = fused(x)
        assert not torch.allclose(stale, tv(x))  # the documented exception, shown
        onednn.clear_cache()
        assert_equivalent(fused(x), tv(x), NET_TOL[torch.float32])


def test_torch_compile_traces_the_composed_path():
    """Under torch.compile the oneDNN cache is not traced (it cannot be): the
    fused model compiles with fullgraph=True and gives the same numbers."""
    torch._dynamo.reset()
    tv, fused = pair("resnet18")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = torch.compile(fused, fullgraph=True, backend="aot_eager")(x)
        assert_equivalent(out, tv(x), NET_TOL[torch.float32])


def _count_conv_norm_act(monkeypatch):
    # pins an internal on purpose: the owned path's promise is that no
    # per-pair call (layers.conv_norm_act) runs between its convolutions,
    # which no output can show; models and stages are its two callers here
    from resnet_fused import layers, models, stages

    calls = []
    real = layers.conv_norm_act

    def counting(conv, *args, **kwargs):
        calls.append(conv)
        return real(conv, *args, **kwargs)

    for module in (models, stages):
        monkeypatch.setattr(module, "conv_norm_act", counting)
    return calls


@pytest.mark.parametrize("dtype", ["float32", "autocast"])
@pytest.mark.parametrize("arch", ["resnet18", "resnet50", "resnext50_32x4d"])
def test_owned_path_runs_cached_convolutions_directly(arch, dtype, monkeypatch):
    """Once a forward has packed every convolution, the next forward's blocks
    call oneDNN straight from the cache (no conv_norm_act), with the same bits."""
    _, fused = pair(arch)
    x = torch.randn(2, 3, 40, 48)
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if dtype == "autocast" else torch.autocast("cpu", enabled=False)
    calls = _count_conv_norm_act(monkeypatch)
    with torch.no_grad(), ctx:
        first = fused(x)
        assert fused.layer1[0].conv1 in calls  # the first forward packs through conv_norm_act
        calls.clear()
        second = fused(x)
    assert calls == [fused.conv1]  # only the stem
    assert torch.equal(first, second)


def _edit_bn_train(m):
    m.layer2[1].bn2.train()


def _edit_new_conv(m):
    torch.manual_seed(5)
    old = m.layer3[0].conv1
    m.layer3[0].conv1 = torch.nn.Conv2d(old.in_channels, old.out_channels, 3, old.stride, 1, bias=True)


def _edit_new_parameter(m):
    m.layer1[1].conv2.weight = torch.nn.Parameter(m.layer1[1].conv2.weight.detach() * 0.5)


def _edit_eps(m):
    m.layer4[1].bn1.eps = 0.5


def _edit_frozen_bn(m):
    from torchvision.ops.misc import FrozenBatchNorm2d

    bn = m.layer2[0].bn1
    frozen = FrozenBatchNorm2d(bn.num_features, eps=bn.eps)
    frozen.load_state_dict({k: v for k, v in bn.state_dict().items() if k != "num_batches_tracked"})
    m.layer2[0].bn1 = frozen


def _edit_relu(m):
    m.layer3[1].relu = torch.nn.LeakyReLU(0.1)


def _edit_relu_function(m):
    del m.layer2[1].relu
    m.layer2[1].relu = torch.nn.functional.relu6  # not a module: an instance attribute


def _edit_downsample(m):
    ds = m.layer2[0].downsample
    m.layer2[0].downsample = torch.nn.Sequential(ds[0], ds[1], torch.nn.Identity())


def _edit_dropped_running_stats(m):
    bn = m.layer1[0].bn2
    bn.running_mean = None
    bn.running_var = None
    bn.track_running_stats = False


EDITS = [_edit_bn_train, _edit_new_conv, _edit_new_parameter, _edit_eps, _edit_frozen_bn, _edit_relu, _edit_relu_function,
         _edit_downsample, _edit_dropped_running_stats]


@pytest.mark.parametrize("edit", EDITS, ids=[e.__name__[6:] for e in EDITS])
def test_changes_between_forwards_are_seen(edit):
    """What a forward with the cache warm must notice: every module edit made
    on both models between two forwards gives torchvision's numbers."""
    tv, fused = pair("resnet18")
    x = torch.randn(2, 3, 48, 40)
    with torch.no_grad():
        fused(x)
        edit(tv)
        edit(fused)
        ref = tv(x)
        assert_equivalent(fused(x), ref, NET_TOL[torch.float32])
        assert_equivalent(fused(x), ref, NET_TOL[torch.float32])  # and again, warm


def test_a_changed_block_gives_the_usual_errors():
    """A convolution swapped for one whose output no longer matches the
    identity fails with the residual error every path gives, warm cache or not."""
    _, fused = pair("resnet18")
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        fused(x)
        fused.layer1[1].conv2 = torch.nn.Conv2d(64, 32, 3, padding=1, bias=False)
        fused.layer1[1].bn2 = torch.nn.BatchNorm2d(32).eval()
        for _ in range(2):
            with pytest.raises(ValueError, match="residual"):
                fused(x)


def test_blocks_that_cannot_be_planned_run_alone_and_the_rest_stay_planned(monkeypatch):
    """A block with a swapped activation runs its own forward; the blocks
    before and after it are still planned and run from the cache."""
    from resnet_fused import stages

    tv, fused = pair("resnet50")
    for model in (tv, fused):
        model.layer2[1].relu = torch.nn.LeakyReLU(0.1)
    x = torch.randn(2, 3, 48, 40)
    alone = []
    real = stages._owned_block_forward
    monkeypatch.setattr(
        stages, "_owned_block_forward", lambda block, x, plan: alone.append(block) or real(block, x, plan)
    )
    calls = _count_conv_norm_act(monkeypatch)
    with torch.no_grad():
        fused(x)
        alone.clear()
        calls.clear()
        out = fused(x)
    assert alone == [fused.layer2[1]]
    assert calls == [fused.conv1]  # the swapped block runs torchvision's forward (plain modules)
    assert_equivalent(out, tv(x), NET_TOL[torch.float32])


def test_alternating_input_sizes_pack_once_and_give_the_bits_of_constant_ones(monkeypatch):
    """Serving mixed batch sizes: each convolution packs once per size and
    never again, Winograd transforms are shared by all sizes, and every
    output has the bits a stream of that size alone gives."""
    _, fused = pair("resnet18")
    sizes = [(1, 3, 64, 64), (3, 3, 64, 64), (2, 3, 48, 56)]
    xs = [torch.randn(s, generator=torch.Generator().manual_seed(i)) for i, s in enumerate(sizes)]
    alone = []
    with torch.no_grad():
        for x in xs:
            onednn.clear_cache()
            alone.append(fused(x))
        onednn.clear_cache()
        reorders = []
        real = torch.ops.mkldnn._reorder_convolution_weight
        monkeypatch.setattr(
            torch.ops.mkldnn, "_reorder_convolution_weight", lambda *a: reorders.append(1) or real(*a)
        )
        for round_ in range(3):
            for x, ref in zip(xs, alone):
                assert torch.equal(fused(x), ref)
            if round_ == 0:
                first = len(reorders)
    assert first > 0 and len(reorders) == first  # rounds 2 and 3 packed nothing
    convs = [m for m in fused.modules() if isinstance(m, torch.nn.Conv2d)]
    for conv in convs:
        packs = onednn.cached(conv)
        assert len(packs) == len(sizes)
        wino = [p.weight for p in packs if p.winograd]
        assert all(w is wino[0] for w in wino)  # one transform for every size
        gemm = [p.weight for p in packs if p.gemm]
        assert all(w is gemm[0] for w in gemm)  # one GEMM packing for every size
    assert any(p.gemm for conv in convs for p in onednn.cached(conv)) == (extension.cpu_gemm_isa() != "generic")


def test_the_cache_holds_a_bounded_number_of_sizes():
    _, fused = pair("resnet18")
    conv = fused.layer1[0].conv1
    with torch.no_grad():
        for n in range(1, onednn.SIZES_PER_CONV + 4):
            fused(torch.randn(n, 3, 32, 32))
    sizes = [p.out_shape[0] for p in onednn.cached(conv)]
    assert sizes == list(range(4, onednn.SIZES_PER_CONV + 4))  # the oldest went first


@pytest.mark.parametrize("how", ["autocast", "model.to(bfloat16)"])
@pytest.mark.parametrize("arch", ["resnet18", "resnet50", "resnext50_32x4d"])
def test_bfloat16_without_onednn_bf16_kernels(arch, how, monkeypatch):
    """CPUs without AVX-512 BW/VL/DQ or AVX-NE-CONVERT (AVX2-only EPYCs) have
    no oneDNN bf16 convolution: bf16 layers compute in fp32 there (Winograd
    included), bf16 in and out, within bf16's tolerance of fp32 torchvision.
    Forced here on any CPU; `test_bfloat16` runs whichever this CPU has."""
    monkeypatch.setattr(onednn, "BF16_NATIVE", False)
    onednn.clear_cache()
    tv, fused = pair(arch)
    x = torch.randn(2, 3, 57, 75, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = tv(x)
        if how == "autocast":
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = fused(x)
                again = fused(x)
        else:
            fused = fused.to(torch.bfloat16)
            out, again = fused(x.bfloat16()), fused(x.bfloat16())
    assert out.dtype == torch.bfloat16 and torch.equal(out, again)
    packs = [p for m in fused.modules() for p in onednn.cached(m)]
    assert packs and all(p.dtype == torch.float32 for p in packs)
    assert any(p.winograd for p in packs) == (arch != "resnext50_32x4d")  # resnext's 3x3s are grouped
    assert any(p.grouped for p in packs) == (arch == "resnext50_32x4d" and onednn._vector_gemm())
    assert_equivalent(out.float(), ref, NET_TOL[torch.bfloat16])
    onednn.clear_cache()


def test_bfloat16_on_a_cpu_limited_to_avx2():
    """The whole bf16 path in a process whose oneDNN may use AVX2 at most
    (ONEDNN_MAX_CPU_ISA, as on an AVX2-only CPU): it detects the missing bf16
    kernels and runs."""
    import subprocess
    import sys

    code = (
        "import torch, torchvision, resnet_fused\n"
        "from resnet_fused.ops.cpu import onednn\n"
        "assert not onednn.BF16_NATIVE\n"
        "torch.manual_seed(0)\n"
        "m = resnet_fused.resnet18().eval()\n"
        "x = torch.randn(1, 3, 64, 64)\n"
        "with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):\n"
        "    out = m(x)\n"
        "with torch.no_grad():\n"
        "    ref = m(x)\n"
        "assert out.dtype == torch.bfloat16\n"
        "err = ((out.float() - ref).norm() / ref.norm()).item()\n"
        "assert err < 1e-2, err\n"
        "print('ok', err)\n"
    )
    env = {**__import__("os").environ, "ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.startswith("ok"), proc.stderr[-2000:]
