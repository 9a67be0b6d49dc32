"""The speed stages: speed (inference throughput), train (one step: time and
peak memory), layers (resnet50 per layer: each Triton candidate, and the
tuner's choice). Times are medians over ctx.repeats runs after warm-up,
measured with CUDA events on a GPU; cudnn.benchmark is on."""
from __future__ import annotations

import copy
import time

import torch
import torch.nn.functional as F

import resnet_fused
from resnet_fused import ops
from resnet_fused.check import backends_for
from resnet_fused.validate.common import Context, capture_graph, max_err
from resnet_fused.validate.model_checks import MODELS, model_pair

CL = torch.channels_last


def _setting(ctx: Context):
    """(models, batches, input size, autocast dtype or None)."""
    if ctx.quick:
        return ("resnet18",), (1, 2), 32, None
    return MODELS, (1, 32, 256), 224, torch.bfloat16


def _amp(ctx: Context, dtype):
    return torch.autocast(ctx.device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def _compile(ctx: Context, model, freezing: bool):
    """Inductor (weights frozen for inference) on a GPU; aot_eager on the
    CPU, whose inductor compile takes minutes."""
    if not ctx.cuda:
        return torch.compile(model, backend="aot_eager")
    # per model (compiling is lazy: a global config would be read at the first call)
    return torch.compile(model, options={"freezing": freezing})


def _implementations(ctx: Context, arch: str, compiled: bool) -> list[tuple]:
    """(name, model, backend or None, memory format) rows for one model."""
    tv, fused = model_pair(arch)
    tv, fused = tv.to(ctx.device).eval(), fused.to(ctx.device).eval()
    if compiled:
        return [("torchvision compile (freezing) channels_last",
                 _compile(ctx, copy.deepcopy(tv).to(memory_format=CL), True), None, CL),
                ("resnet_fused auto compile channels_last",
                 _compile(ctx, copy.deepcopy(fused).to(memory_format=CL), False), "auto", CL)]
    rows = [("torchvision eager", tv, None, torch.contiguous_format),
            ("torchvision eager channels_last", copy.deepcopy(tv).to(memory_format=CL), None, CL),
            ("resnet_fused auto", fused, "auto", torch.contiguous_format)]
    fused_cl = copy.deepcopy(fused).to(memory_format=CL)
    for backend in ["auto"] + backends_for(ctx.device)[1:]:
        rows.append((f"resnet_fused {backend} channels_last", fused_cl, backend, CL))
    return rows


def _interpreted(ctx: Context, backend) -> bool:
    return not ctx.cuda and backend == "triton"


def _measure(ctx: Context, arch: str, batch: int, size: int, dtype, compiled: bool, ref_holder: dict) -> None:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(batch, 3, size, size, generator=g).to(ctx.device)
    first_batch = batch == _setting(ctx)[1][0]
    for name, model, backend, fmt in _implementations(ctx, arch, compiled):
        if _interpreted(ctx, backend) and not first_batch:
            continue  # the interpreter's speed says nothing: once, at the first batch size
        xi = x.to(memory_format=fmt)

        def run(model=model, backend=backend, xi=xi):
            with torch.no_grad(), _amp(ctx, dtype), resnet_fused.backend(backend or "auto"):
                return model(xi)

        try:
            t0 = time.perf_counter()
            out = run()  # the first call tunes and compiles; the timing's warm-up follows
            if _interpreted(ctx, backend):  # once is enough to say it runs (and how slowly)
                ms = (time.perf_counter() - t0) * 1e3
            else:
                ms = ctx.time_ms(run, ctx.repeats)
        except Exception as e:  # a row that cannot run is reported, the others still run
            ctx.emit(table="inference", model=arch, batch=batch, implementation=name, error=f"{type(e).__name__}: {e}"[:200])
            continue
        key = (arch, batch)
        ref_holder.setdefault(key, (out.float(), ms))
        ref, base_ms = ref_holder[key]
        ctx.emit(table="inference", model=arch, batch=batch, implementation=name, ms=ms,
                 images_per_s=batch / ms * 1e3, vs_torchvision_eager=base_ms / ms, max_err=max_err(out.float(), ref))


def warmup(ctx: Context) -> None:
    """Compile ahead, in parallel: this process's share of the speed rows'
    forwards, run once. Each Triton kernel (every tiling the tuner tries)
    and each torch.compile graph lands in the on-disk caches (Triton's,
    inductor's FX graph cache), where the speed stage's one process finds
    it instead of compiling everything in a row."""
    archs, batches, size, dtype = _setting(ctx)
    items = [(arch, batch, compiled) for compiled in ((False,) if ctx.quick else (False, True))
             for arch in archs for batch in batches]
    if not ctx.cuda:  # nothing compiles ahead on the CPU: one row shows the mechanism
        items = items[:1]
    for arch, batch, compiled in ctx.mine(items):
        x = torch.randn(batch, 3, size, size).to(ctx.device)
        for name, model, backend, fmt in _implementations(ctx, arch, compiled):
            if _interpreted(ctx, backend) or (not ctx.cuda and name != "resnet_fused auto channels_last"):
                continue
            t0 = time.perf_counter()
            try:
                with torch.no_grad(), _amp(ctx, dtype), resnet_fused.backend(backend or "auto"):
                    model(x.to(memory_format=fmt))
                ctx.sync()
                ctx.emit(table="compiled ahead", model=arch, batch=batch, implementation=name,
                         seconds=time.perf_counter() - t0)
            except Exception as e:  # the speed stage reports it where it counts
                ctx.emit(table="compiled ahead", model=arch, batch=batch, implementation=name,
                         error=f"{type(e).__name__}: {e}"[:200])
        if ctx.cuda:
            torch.cuda.empty_cache()


def speed(ctx: Context) -> None:
    torch.backends.cudnn.benchmark = True
    archs, batches, size, dtype = _setting(ctx)
    refs = {}
    # every eager row first, the torch.compile rows (minutes of compiling) last
    # (quick: no compiled rows; the compile stage compiles on the CPU already)
    for compiled in (False,) if ctx.quick else (False, True):
        for arch in archs:
            for batch in batches:
                _measure(ctx, arch, batch, size, dtype, compiled, refs)
                if ctx.cuda:
                    torch.cuda.empty_cache()
            if ctx.cuda and not compiled and 1 in batches:
                _graph_rows(ctx, arch, size, dtype, refs)


def _graphed(ctx: Context, model, x, backend, dtype):
    """(replay, static output) of `model(x)` captured in a CUDA graph."""
    # no autocast weight cache: a graph must not capture a cast made once outside it
    amp = torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None, cache_enabled=False)
    with torch.no_grad(), amp, resnet_fused.backend(backend or "auto"):
        return capture_graph(lambda: model(x))


def _graph_rows(ctx: Context, arch: str, size: int, dtype, refs: dict) -> None:
    """Batch 1, where launches and Python cost more than the kernels: the
    fused model and torchvision replayed from CUDA graphs, and each under
    torch.compile(mode="reduce-overhead") (Inductor's own graphs), beside
    the eager rows of the same batch (`vs_torchvision_eager` against
    torchvision eager NCHW, as every row)."""
    tv, fused = model_pair(arch)
    tv = tv.to(ctx.device).eval().to(memory_format=CL)
    fused = fused.to(ctx.device).eval().to(memory_format=CL)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 3, size, size, generator=g).to(ctx.device).to(memory_format=CL)
    ref, base_ms = refs[(arch, 1)]
    rows = (
        ("torchvision eager channels_last CUDA graph", tv, None, False),
        ("resnet_fused auto channels_last CUDA graph", fused, "auto", False),
        ("torchvision compile reduce-overhead channels_last", tv, None, True),
        ("resnet_fused auto compile reduce-overhead channels_last", fused, "auto", True),
    )
    for name, model, backend, compiled in rows:
        try:
            if compiled:
                model = torch.compile(copy.deepcopy(model), mode="reduce-overhead")

                def run(model=model, backend=backend):
                    with torch.no_grad(), _amp(ctx, dtype), resnet_fused.backend(backend or "auto"):
                        return model(x)
            else:
                replay, out = _graphed(ctx, model, x, backend, dtype)

                def run(replay=replay, out=out):
                    replay()
                    return out
            ms = ctx.time_ms(run, ctx.repeats)  # (its warm-up compiles the reduce-overhead rows)
            err = max_err(run().float(), ref)
        except Exception as e:  # reported; the other rows still run
            ctx.emit(table="inference", model=arch, batch=1, implementation=name, error=f"{type(e).__name__}: {e}"[:200])
            continue
        ctx.emit(table="inference", model=arch, batch=1, implementation=name, ms=ms, images_per_s=1e3 / ms,
                 vs_torchvision_eager=base_ms / ms, max_err=err)
        torch._dynamo.reset()


def _saved_bytes(model, x, target, backend) -> int:
    from resnet_fused.bench import saved_bytes

    with resnet_fused.backend(backend or "auto"):
        return saved_bytes(model, x, target)


def train(ctx: Context) -> None:
    """One SGD step per implementation: median time and the memory it takes
    (CUDA: peak allocated above the model's own; CPU: bytes autograd keeps)."""
    torch.backends.cudnn.benchmark = True
    archs, batches, size, dtype = _setting(ctx)
    batch = 2 if ctx.quick else 32
    for arch in archs:
        tv, fused = model_pair(arch)
        impls = [("torchvision", tv, None), ("resnet_fused auto", fused, "auto"),
                 ("resnet_fused auto memory_efficient", resnet_fused.memory_efficient(copy.deepcopy(fused)), "auto")]
        impls += [(f"resnet_fused {b}", copy.deepcopy(fused), b) for b in backends_for(ctx.device)[1:]]
        g = torch.Generator().manual_seed(3)
        x = torch.randn(batch, 3, size, size, generator=g).to(ctx.device).to(memory_format=CL)
        target = torch.randint(0, 1000, (batch,), generator=g).to(ctx.device)
        for name, model, backend in impls:
            model = copy.deepcopy(model).to(ctx.device).train().to(memory_format=CL)
            opt = torch.optim.SGD(model.parameters(), lr=1e-4)

            def step(model=model, opt=opt, backend=backend):
                with resnet_fused.backend(backend or "auto"):
                    opt.zero_grad(set_to_none=True)
                    with _amp(ctx, dtype):
                        loss = F.cross_entropy(model(x), target)
                    loss.backward()
                    opt.step()
                return loss

            try:
                if not _interpreted(ctx, backend):  # (interpreted: nothing to warm up, every pass is slow)
                    step()
                memory = _peak_bytes(ctx, step) if ctx.cuda else _saved_bytes(model, x, target, backend)
                repeats = 1 if _interpreted(ctx, backend) else max(3, ctx.repeats // 2)
                ms = ctx.time_ms(step, repeats, warmup=0 if _interpreted(ctx, backend) else 1)
            except Exception as e:
                ctx.emit(table="train step", model=arch, implementation=name, error=f"{type(e).__name__}: {e}"[:200])
                continue
            ctx.emit(table="train step", model=arch, batch=batch, implementation=name, ms=ms,
                     images_per_s=batch / ms * 1e3, memory_MiB=memory / 2**20,
                     memory_is="peak allocated" if ctx.cuda else "kept for backward")
            del model, opt
            if ctx.cuda:
                torch.cuda.empty_cache()


def _peak_bytes(ctx: Context, step) -> int:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


# ---- layers ------------------------------------------------------------------


def resnet50_layers(batch: int, size: int) -> list[dict]:
    """Every distinct convolution of resnet50 at this input, with its count."""
    import torchvision

    model = torchvision.models.resnet50().eval()
    seen = {}
    hooks = []
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Conv2d):
            def hook(m, inp, _out, name=name):
                key = (tuple(inp[0].shape), tuple(m.weight.shape), m.stride, m.padding, m.dilation, m.groups)
                seen.setdefault(key, {"layer": name, "count": 0})["count"] += 1
            hooks.append(m.register_forward_hook(hook))
    with torch.no_grad():  # shapes only: on the meta device nothing is computed
        model.to("meta")(torch.empty(batch, 3, size, size, device="meta"))
    for h in hooks:
        h.remove()
    return [dict(v, x=k[0], w=k[1], stride=k[2], padding=k[3], dilation=k[4], groups=k[5]) for k, v in seen.items()]


def _flops_bytes(layer: dict, out_shape, esize: int) -> tuple[int, int]:
    n, k, p, q = out_shape
    _, c_g, r, s = layer["w"]
    flops = 2 * n * k * p * q * c_g * r * s
    numel = lambda shape: int(torch.Size(shape).numel())  # noqa: E731
    nbytes = (numel(layer["x"]) + numel(layer["w"]) + n * k * p * q) * esize + 2 * k * 4
    return flops, nbytes


def _candidates(ctx: Context, x, w, scale, shift, conv_args, out_shape) -> dict:
    """name -> zero-argument launcher: each Triton tiling the launcher can
    pick and cuDNN + the Triton epilogue (GPU), or each backend of the CPU
    but the interpreted one."""
    if not ctx.cuda:
        def op(backend):
            def run():
                with resnet_fused.backend(backend):
                    return ops.conv_bn_act(x, w, scale, shift, None, True, **conv_args)
            return run
        return {b: op(b) for b in backends_for(ctx.device) if b != "triton"}  # interpreted: not a speed
    from resnet_fused.ops.triton import batch_norm, conv, cudnn_fused
    from resnet_fused.ops.triton.fold import Affine

    stride, padding, dilation, groups = (conv_args[k] for k in ("stride", "padding", "dilation", "groups"))
    affine = Affine.given(scale.float().contiguous(), shift.float().contiguous())
    out = conv.output_like(x, out_shape)
    cands = {}
    for cfg in conv.configs_for(x.dtype, w.shape[1], conv.needs_int64(x, w, out)):
        cands[cfg.name] = (lambda cfg=cfg: conv.launch(x, w, affine, None, True, stride, padding, dilation,
                                                       groups, out, cfg))

    def cudnn():
        y = F.conv2d(x, w, None, stride, padding, dilation, groups)
        return batch_norm.affine_act_(y, affine, None, True, batch_norm.KERNELS)

    cands["cudnn"] = cudnn  # (the tuner's name for cuDNN + the Triton epilogue)
    if cudnn_fused.applies(x, w, None, True, 0):  # cuDNN's fused conv + bias + ReLU, BN in its weight
        cands[cudnn_fused.NAME] = lambda: cudnn_fused.run(x, w, affine, None, stride, padding, dilation, groups,
                                                          lambda s: conv.output_like(x, s))
    cands["cudnn conv only"] = lambda: F.conv2d(x, w, None, stride, padding, dilation, groups)  # the floor to beat
    cands.update(_hopper_candidates(x, w, affine, conv_args, out))
    return cands


def _hopper_candidates(x, w, affine, conv_args, out) -> dict:
    """The Hopper TMA kernel's tilings (ops/triton/conv_tma.py), on sm_90 and
    where it applies to the layer; none elsewhere."""
    from resnet_fused.ops.triton import conv_tma

    args = tuple(conv_args[k] for k in ("stride", "padding", "dilation", "groups"))
    if torch.cuda.get_device_capability(x.device)[0] != 9 or not conv_tma.applies(x, w, None, *args):
        return {}
    return {cfg.name: (lambda cfg=cfg: conv_tma.launch(x, w, affine, None, True, *args, out, cfg))
            for cfg in conv_tma.CONFIGS_SM90}


def _tuner_choice(ctx: Context, x, w, scale, shift, conv_args) -> str:
    """What the triton backend's tuner picks for this call (the entry its
    call adds to the tuning cache), or on the CPU what `auto` resolves to."""
    if not ctx.cuda:
        return resnet_fused.backends.resolve_name("conv_bn_act", x.device)
    from resnet_fused.ops.triton import tuning

    before = tuning.choices()
    with resnet_fused.backend("triton"):
        ops.conv_bn_act(x, w, scale, shift, None, True, **conv_args)
    added = [v for k, v in tuning.choices().items() if k not in before]
    if not added:
        return "cached earlier"
    return getattr(added[0], "name", str(added[0]))


def layers(ctx: Context) -> None:
    torch.backends.cudnn.benchmark = True
    batch, size = (1, 32) if ctx.quick else (32, 224)
    dtype = torch.float32 if not ctx.cuda else torch.bfloat16
    if ctx.cuda:  # the speed stage, earlier in this process, tuned these shapes: each choice is made again here
        from resnet_fused.ops.triton import tuning

        tuning.clear()
    for layer in resnet50_layers(batch, size):
        g = torch.Generator().manual_seed(1)
        x = torch.randn(layer["x"], generator=g).to(ctx.device, dtype).to(memory_format=CL)
        w = (torch.randn(layer["w"], generator=g) * 0.05).to(ctx.device, dtype).to(memory_format=CL)
        k = layer["w"][0]
        scale, shift = torch.rand(k, device=ctx.device) + 0.5, torch.randn(k, device=ctx.device)
        conv_args = dict(stride=layer["stride"], padding=layer["padding"], dilation=layer["dilation"],
                         groups=layer["groups"])
        out_shape = ops.conv_out_shape(x, w, layer["stride"], layer["padding"], layer["dilation"])
        flops, nbytes = _flops_bytes(layer, out_shape, x.element_size())
        try:
            chosen = _tuner_choice(ctx, x, w, scale, shift, conv_args)
        except Exception as e:
            chosen = f"failed: {type(e).__name__}: {e}"[:120]
        shape = f"{'x'.join(map(str, layer['x']))} -> {'x'.join(map(str, out_shape))} " \
                f"{layer['w'][2]}x{layer['w'][3]}/{layer['stride'][0]} g{layer['groups']}"
        for name, fn in _candidates(ctx, x, w, scale, shift, conv_args, out_shape).items():
            row = dict(table="resnet50 per layer", layer=layer["layer"], count=layer["count"], shape=shape,
                       candidate=name, chosen="yes" if name == chosen else "")
            try:
                ms = ctx.time_ms(fn, ctx.repeats)
            except Exception as e:  # a tiling that does not fit (shared memory) is shown, not fatal
                ctx.emit(**row, error=f"{type(e).__name__}: {e}"[:120])
                continue
            ctx.emit(**row, ms=ms, tflop_per_s=flops / ms / 1e9, gb_per_s=nbytes / ms / 1e6, tuner_choice=chosen)
