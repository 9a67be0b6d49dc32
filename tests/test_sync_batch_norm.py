"""SyncBatchNorm in fused blocks (resnet_fused/sync_batch_norm.py,
ops/sync_batch_norm.py): two gloo processes on loopback train float64 CIFAR
ResNets and must match one process training on the union of their batches —
loss, every parameter gradient, running statistics, num_batches_tracked —
with the fused sync op doing every BN (tests/sync_batch_norm_worker.py runs
the ranks)."""
from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

import resnet_fused
from resnet_fused.ops import sync_batch_norm as sync_ops

sys.path.insert(0, str(Path(__file__).parent))
import sync_batch_norm_worker as worker  # noqa: E402

WORLD = 2
TIMEOUT_S = 150  # a hung collective fails the test instead of hanging CI
# float64 through 8 layers: the reductions' order differs from one process's,
# and nothing else (measured ~1e-14)
TOL = dict(rtol=1e-11, atol=1e-13)


def _run_ranks(tmp_path: Path, device: str, scenarios) -> list[dict]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    init = tmp_path / "rendezvous"  # FileStore: no port to find; gloo's pairs use loopback TCP
    procs, logs = [], []
    for rank in range(WORLD):
        log = open(tmp_path / f"rank{rank}.log", "w+")
        logs.append(log)
        procs.append(subprocess.Popen(
            [sys.executable, worker.__file__, str(rank), str(WORLD), str(init), device,
             str(tmp_path / f"rank{rank}.pt"), *scenarios],
            stdout=log, stderr=subprocess.STDOUT, env=env,
        ))
    try:
        for p in procs:
            p.wait(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail(f"the gloo ranks did not finish in {TIMEOUT_S} s:\n" + _logs(logs))
    if any(p.returncode for p in procs):
        pytest.fail("a rank failed:\n" + _logs(logs))
    return [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(WORLD)]


def _logs(logs) -> str:
    out = []
    for log in logs:
        log.seek(0)
        out.append(log.read()[-4000:])
    return "\n----\n".join(out)


def _reference(scenario: str, device: str) -> dict:
    """One process, the fused model unconverted, each step on the union batch."""
    model = worker.build_model(scenario, device).train()
    opt = torch.optim.SGD(model.parameters(), lr=worker.LR)
    losses, grads = [], []
    for step in worker.batches(scenario, device):
        x = torch.cat([b[0] for b in step])
        y = torch.cat([b[1] for b in step])
        opt.zero_grad()
        loss = worker.loss_of(model(x), y, worker.total_count(scenario))
        loss.backward()
        losses.append(loss.detach().cpu())
        grads.append({n: p.grad.detach().cpu().clone() for n, p in model.named_parameters()})
        opt.step()
    return {"losses": losses, "grads": grads, "state": worker.state(model)}


def _bn_count(scenario: str) -> int:
    return sum(isinstance(m, nn.BatchNorm2d) for m in worker.build_model(scenario, "cpu").modules())


def _check(results: list[dict], scenario: str, device: str) -> None:
    ref = _reference(scenario, device)
    efficient = worker.SCENARIOS[scenario][2]
    expected_op = "conv_sync_bn_act_train" if efficient else "sync_batch_norm_act"
    for rank, res in enumerate(results):
        got = res[scenario]
        # every BN of every step ran as the fused sync op of the configured kind
        assert got["sync_calls"] == [expected_op] * (_bn_count(scenario) * worker.STEPS), (rank, got["sync_calls"])
        assert got["unfused"] == []
        for step, (loss, ref_loss) in enumerate(zip(got["losses"], ref["losses"])):
            torch.testing.assert_close(loss, ref_loss, **TOL, msg=lambda m: f"rank {rank} step {step} loss: {m}")
        for step, (grads, ref_grads) in enumerate(zip(got["grads"], ref["grads"])):
            assert grads.keys() == ref_grads.keys()
            for name in ref_grads:
                torch.testing.assert_close(
                    grads[name], ref_grads[name], **TOL, msg=lambda m: f"rank {rank} step {step} grad {name}: {m}"
                )
        assert got["state"].keys() == ref["state"].keys()
        for key, value in ref["state"].items():
            # running_mean/var, num_batches_tracked (exactly) and the parameters after the steps
            torch.testing.assert_close(got["state"][key], value, **TOL, msg=lambda m: f"rank {rank} {key}: {m}")


@pytest.fixture(scope="module")
def cpu_results(tmp_path_factory):
    return _run_ranks(tmp_path_factory.mktemp("sync_bn_cpu"), "cpu", [*worker.SCENARIOS, "op"])


@pytest.mark.parametrize("scenario", list(worker.SCENARIOS))
def test_two_ranks_equal_one_process_on_the_union(cpu_results, scenario):
    _check(cpu_results, scenario, "cpu")


def _op_reference(device: str) -> list[dict]:
    """F.batch_norm on the union batch + the zero-padded residual, ReLU; per rank's rows."""
    ranks, params = worker.op_inputs()
    x = torch.cat([r[0] for r in ranks]).to(device).requires_grad_()
    residual = torch.cat([r[1] for r in ranks]).to(device).requires_grad_()
    grad_out = torch.cat([r[2] for r in ranks]).to(device)
    weight, bias = (p.to(device).requires_grad_() for p in params[:2])
    running_mean, running_var = (p.to(device) for p in params[2:])
    cr, offset = worker.OP_RESIDUAL
    padded = torch.nn.functional.pad(residual, (0, 0, 0, 0, offset, worker.OP_CHANNELS - offset - cr))
    out = torch.relu(
        torch.nn.functional.batch_norm(x, running_mean, running_var, weight, bias, True, worker.OP_MOMENTUM,
                                       worker.OP_EPS) + padded
    )
    (out * grad_out).sum().backward()
    rows, start = [], 0
    for n in worker.OP_SIZES:
        sl = slice(start, start + n)
        start += n
        rows.append({
            "out": out[sl], "grad_x": x.grad[sl], "grad_residual": residual.grad[sl], "grad_weight": weight.grad,
            "grad_bias": bias.grad, "running_mean": running_mean, "running_var": running_var,
        })
    return rows


def _check_op(results: list[dict], device: str) -> None:
    # docs/design.md §5: fp32 within 1e-5 of the reference, by relative norm
    for rank, (res, ref) in enumerate(zip(results, _op_reference(device))):
        got = res["op"]
        assert got["channels_last"], "the output keeps x's memory format"
        for key, want in ref.items():
            want = want.detach().cpu()
            err = ((got[key] - want).norm() / want.norm()).item()
            assert err <= 1e-5, (rank, key, err)


def test_op_in_fp32_channels_last_with_a_narrow_residual(cpu_results):
    _check_op(cpu_results, "cpu")


def test_module_alone_on_2d_input(cpu_results):
    # FusedSyncBatchNorm called as a module (BatchNorm1d-shaped input, cumulative momentum)
    # equals nn.BatchNorm1d on the union of the ranks' inputs
    ranks, _ = worker.op_inputs()
    features = [r[0].mean((2, 3)) * (1 + i) for i, r in enumerate(ranks)]
    bn = nn.BatchNorm1d(worker.OP_CHANNELS, momentum=None)
    for _ in range(2):
        out = bn(torch.cat(features))
    want_state = worker.state(bn)
    start = 0
    for rank, res in enumerate(cpu_results):
        n = features[rank].shape[0]
        torch.testing.assert_close(res["op"]["module_out"], out[start : start + n].detach(), rtol=1e-5, atol=1e-6)
        start += n
        assert res["op"]["module_state"].keys() == want_state.keys()
        for key, want in want_state.items():
            torch.testing.assert_close(res["op"]["module_state"][key], want, rtol=1e-5, atol=1e-6)


def test_the_comparison_can_fail():
    # unsynchronised, each rank normalises with its own batch's statistics
    # (its data come from another distribution than the other rank's): the
    # sum of the ranks' losses is then far from the union batch's loss
    scenario = "ddp"
    model = worker.build_model(scenario, "cpu").train()
    local = sum(
        worker.loss_of(model(x), y, worker.total_count(scenario)).detach() for x, y in worker.batches(scenario, "cpu")[0]
    )
    with pytest.raises(AssertionError):
        torch.testing.assert_close(local, _reference(scenario, "cpu")["losses"][0], **TOL)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: none is visible to torch")
def test_two_ranks_on_cuda_with_torch_converter(tmp_path):
    # both ranks on one GPU: gloo carries CUDA tensors (NCCL needs a GPU per rank)
    results = _run_ranks(tmp_path, "cuda", ["torch_converter", "ddp", "op"])
    for scenario in ("torch_converter", "ddp"):
        _check(results, scenario, "cuda")
    _check_op(results, "cuda")


# --- one process -----------------------------------------------------------------------------


@pytest.fixture
def world_of_one(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _train_step(model, x):
    out = model(x)
    out.square().sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, worker.state(model)


@pytest.mark.parametrize("initialised", [False, True], ids=["no_process_group", "world_of_one"])
def test_single_process_is_plain_batch_norm(request, initialised):
    if initialised:
        request.getfixturevalue("world_of_one")
    x = worker.batches("ddp", "cpu")[0][1][0]
    plain = worker.build_model("ddp", "cpu").train()
    synced = resnet_fused.convert_sync_batchnorm(worker.build_model("ddp", "cpu")).train()
    calls = []
    original = sync_ops.SyncParts.forward
    sync_ops.SyncParts.forward = lambda self, *a: calls.append(1) or original(self, *a)
    try:
        got = _train_step(synced, x)
    finally:
        sync_ops.SyncParts.forward = original
    want = _train_step(plain, x)
    assert calls == []  # nothing to reduce across: the plain fused path, same bits
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("backend", ["auto", "eager"])
def test_op_in_a_world_of_one_is_batch_norm_act(world_of_one, dtype, tol, backend):
    # the group's statistics are the rank's: the op is ops.batch_norm_act (training), any dtype
    g = torch.Generator().manual_seed(5)
    x0 = (torch.randn(3, 4, 5, 5, generator=g) * 2 + 1).to(dtype).contiguous(memory_format=torch.channels_last)
    res0 = torch.randn(3, 4, 5, 5, generator=g).to(dtype)
    grad = torch.randn(3, 4, 5, 5, generator=g).to(dtype)
    w0, b0 = 1 + 0.3 * torch.randn(4, generator=g), 0.2 * torch.randn(4, generator=g)

    def run(op):
        x, res, w, b = (t.clone().requires_grad_() for t in (x0, res0, w0, b0))
        rm, rv = torch.zeros(4), torch.ones(4)
        with resnet_fused.backend(backend):
            out = op(x, w, b, rm, rv, 0.1, 1e-5, res, True)
        (out.float() * grad.float()).sum().backward()
        return out, x.grad, res.grad, w.grad, b.grad, rm, rv

    got = run(sync_ops.sync_batch_norm_act)
    want = run(lambda x, w, b, rm, rv, m, e, r, relu: resnet_fused.ops.batch_norm_act(x, w, b, rm, rv, True, m, e, r, relu))
    assert got[0].dtype == dtype and got[0].is_contiguous(memory_format=torch.channels_last)
    for a, b in zip(got, want):
        assert ((a.float() - b.float()).norm() / b.float().norm()).item() <= tol


@pytest.mark.parametrize("convert", ["resnet_fused", "torch"])
def test_eval_is_the_inference_path_over_running_statistics(convert):
    # fp32 on CPU: the oneDNN path over folded running statistics, whose bits
    # differ from the composed path's, so equal bits say the same path ran
    def build():
        torch.manual_seed(0)
        model = resnet_fused.resnet18(num_classes=4)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
        return model.eval()

    plain = build()
    converter = resnet_fused.convert_sync_batchnorm if convert == "resnet_fused" else nn.SyncBatchNorm.convert_sync_batchnorm
    synced = converter(build())
    assert any(type(m) in (nn.SyncBatchNorm, resnet_fused.FusedSyncBatchNorm) for m in synced.modules())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")  # no "runs unfused" warning
        torch.testing.assert_close(synced(x), plain(x), rtol=0, atol=0)


def test_convert_shares_parameters_and_buffers_like_torch():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Sequential(nn.BatchNorm1d(5, affine=False)))
    bn, bn1d = model[1], model[2][0]
    converted = resnet_fused.convert_sync_batchnorm(model)
    assert converted is model
    new, new1d = model[1], model[2][0]
    assert type(new) is resnet_fused.FusedSyncBatchNorm and type(new1d) is resnet_fused.FusedSyncBatchNorm
    assert new.weight is bn.weight and new.bias is bn.bias
    assert new.running_mean is bn.running_mean and new.num_batches_tracked is bn.num_batches_tracked
    assert new1d.weight is None and new1d.running_var is bn1d.running_var and new1d.num_features == 5
    # not a torch SyncBatchNorm, which DDP refuses on CPU
    assert not isinstance(new, nn.SyncBatchNorm)
    lone = nn.BatchNorm2d(3)
    assert type(resnet_fused.convert_sync_batchnorm(lone)) is resnet_fused.FusedSyncBatchNorm


def test_bad_arguments_name_themselves():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        resnet_fused.convert_sync_batchnorm("resnet18")
    with pytest.raises(TypeError, match="process_group must be a torch.distributed.ProcessGroup or None, got int"):
        resnet_fused.convert_sync_batchnorm(nn.BatchNorm2d(3), process_group=3)
    with pytest.raises(TypeError, match="process_group must be"):
        resnet_fused.FusedSyncBatchNorm(3, process_group="world")
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(RuntimeError, match="needs torch.distributed initialised"):
        sync_ops.sync_batch_norm_act(x, None, None, None, None)


def test_merge_is_the_union_statistics():
    # Chan's merge of (mean, biased var, count) equals the statistics of the
    # concatenation, empty parts included
    g = torch.Generator().manual_seed(3)
    parts = [torch.randn(n, 3, dtype=torch.float64, generator=g) * 3 + 100 for n in (5, 0, 1, 7)]
    means = torch.stack([p.mean(0) if len(p) else torch.zeros(3, dtype=torch.float64) for p in parts])
    variances = torch.stack([p.var(0, correction=0) if len(p) else torch.zeros(3, dtype=torch.float64) for p in parts])
    counts = torch.tensor([len(p) for p in parts])
    mean, var, total = sync_ops.merge_stats(means, variances, counts)
    union = torch.cat(parts)
    assert total == len(union)
    torch.testing.assert_close(mean, union.mean(0), rtol=1e-14, atol=0)
    torch.testing.assert_close(var, union.var(0, correction=0), rtol=1e-12, atol=0)
