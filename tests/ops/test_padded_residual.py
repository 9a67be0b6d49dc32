"""residual_channel_offset: a residual with fewer channels than the output,
read in place through any strides (the option-A shortcut: a stride-2 view of
the block input, zero-padded on the channel axis) on every backend, equal to
the same op on the materialised padded residual."""
import pytest
import torch
import torch.nn.functional as F

import resnet_fused
from resnet_fused import ops
from conftest import OP_TOL, assert_equivalent, device_backend_params, pair_marks

FORMATS = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}


def _block_input(memory_format, dtype=torch.float32, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    # the option-A situation: 8 -> 16 channels, stride 2; the shortcut is
    # x[:, :, ::2, ::2] zero-padded by 4 channels on each side
    x = torch.randn(2, 8, 10, 9, generator=g, dtype=torch.float64).to(device, dtype).to(memory_format=memory_format)
    w = (torch.randn(16, 8, 3, 3, generator=g, dtype=torch.float64) * 0.3).to(device, dtype)
    scale = (torch.rand(16, generator=g) + 0.5).to(device)
    shift = torch.randn(16, generator=g).to(device)
    return x, w, scale, shift


def _padded(view, channels, offset):
    return F.pad(view, (0, 0, 0, 0, offset, channels - offset - view.shape[1]))


@pytest.mark.parametrize("device, backend", device_backend_params())
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("offset", [4, 0, 8])
@pytest.mark.parametrize("relu", [True, False])
def test_conv_bn_act_reads_the_padded_subsampled_shortcut(device, backend, fmt, offset, relu):
    x, w, scale, shift = _block_input(FORMATS[fmt], device=device)
    shortcut = x[:, :, ::2, ::2]  # a view: nothing copied
    assert shortcut.data_ptr() == x.data_ptr()
    with resnet_fused.backend(backend):
        got = ops.conv_bn_act(x, w, scale, shift, shortcut, relu, stride=2, padding=1, residual_channel_offset=offset)
        want = ops.conv_bn_act(x, w, scale, shift, _padded(shortcut, 16, offset), relu, stride=2, padding=1)
    expected = F.conv2d(x.double(), w.double(), None, 2, 1) * scale.double()[:, None, None] + shift.double()[:, None, None]
    expected = expected + _padded(shortcut.double(), 16, offset)
    expected = expected.relu() if relu else expected
    assert_equivalent(got, expected, OP_TOL[torch.float32])
    assert_equivalent(got, want, OP_TOL[torch.float32])
    assert got.is_contiguous(memory_format=FORMATS[fmt])


@pytest.mark.parametrize("device, backend", device_backend_params())
@pytest.mark.parametrize("fmt", FORMATS)
def test_batch_norm_act_padded_residual_forward_and_gradients(device, backend, fmt):
    """Train mode: outputs, running stats and the gradients of x, γ, β and the
    block input (through the strided view) equal the padded composition."""
    g = torch.Generator().manual_seed(1)
    y0 = torch.randn(2, 16, 5, 5, generator=g, dtype=torch.float64).to(device).to(memory_format=FORMATS[fmt])
    inp0 = torch.randn(2, 8, 10, 9, generator=g, dtype=torch.float64).to(device).to(memory_format=FORMATS[fmt])
    gamma0, beta0 = torch.rand(16, generator=g, dtype=torch.float64) + 0.5, torch.randn(16, generator=g, dtype=torch.float64)
    gamma0, beta0 = gamma0.to(device), beta0.to(device)
    grad = torch.randn(2, 16, 5, 5, generator=g, dtype=torch.float64).to(device)
    results = []
    for padded_in_op in (True, False):
        y, inp, gamma, beta = (t.clone().requires_grad_() for t in (y0, inp0, gamma0, beta0))
        rm, rv = torch.zeros(16, dtype=torch.float64, device=device), torch.ones(16, dtype=torch.float64, device=device)
        shortcut = inp[:, :, ::2, ::2]
        with resnet_fused.backend(backend):
            if padded_in_op:
                out = ops.batch_norm_act(y, gamma, beta, rm, rv, True, residual=shortcut, residual_channel_offset=4)
            else:
                out = ops.batch_norm_act(y, gamma, beta, rm, rv, True, residual=_padded(shortcut, 16, 4))
        grads = torch.autograd.grad(out, (y, inp, gamma, beta), grad)
        results.append((out, rm, rv, *grads))
    for name, a, b in zip(["out", "running_mean", "running_var", "dy", "dinput", "dgamma", "dbeta"], *results):
        assert_equivalent(a, b, 1e-12, name)
    # only the sampled pixels of the input receive gradient
    dinput = results[0][4]
    assert torch.count_nonzero(dinput[:, :, 1::2, :]) == 0 and torch.count_nonzero(dinput[:, :, :, 1::2]) == 0


@pytest.mark.parametrize("device, backend", device_backend_params())
def test_conv_bn_act_train_padded_residual(device, backend):
    x, w, _, _ = _block_input(torch.contiguous_format, torch.float64, device=device)
    gamma = torch.rand(16, dtype=torch.float64, device=device) + 0.5
    beta = torch.randn(16, dtype=torch.float64, device=device)
    with resnet_fused.backend(backend):
        got = ops.conv_bn_act_train(x, w, gamma, beta, None, None, residual=x[:, :, ::2, ::2], stride=2, padding=1,
                                    residual_channel_offset=4)
        want = ops.batch_norm_act(F.conv2d(x, w, None, 2, 1), gamma, beta, None, None, True,
                                  residual=_padded(x[:, :, ::2, ::2], 16, 4))
    assert_equivalent(got, want, 1e-12)


def test_padded_residual_bad_input_names_the_argument():
    x, w, scale, shift = _block_input(torch.contiguous_format)
    shortcut = x[:, :, ::2, ::2]
    with pytest.raises(ValueError, match="residual must have the output's shape"):
        ops.conv_bn_act(x, w, scale, shift, shortcut, stride=2, padding=1)  # no offset: shapes must match
    with pytest.raises(ValueError, match="residual_channel_offset=9"):
        ops.conv_bn_act(x, w, scale, shift, shortcut, stride=2, padding=1, residual_channel_offset=9)
    with pytest.raises(ValueError, match="residual_channel_offset=-1"):
        ops.conv_bn_act(x, w, scale, shift, shortcut, stride=2, padding=1, residual_channel_offset=-1)
    with pytest.raises(ValueError, match=r"shape \(2, C, 5, 5\)"):
        ops.conv_bn_act(x, w, scale, shift, x, stride=2, padding=1, residual_channel_offset=4)
    with pytest.raises(TypeError, match="residual_channel_offset must be an int"):
        ops.conv_bn_act(x, w, scale, shift, shortcut, stride=2, padding=1, residual_channel_offset=4.0)
    with pytest.raises(ValueError, match="residual_channel_offset=20"):
        ops.batch_norm_act(torch.randn(2, 16, 5, 5), None, None, None, None, True, residual=shortcut,
                           residual_channel_offset=20)


@pytest.mark.parametrize("device", [pytest.param(d, marks=pair_marks(d, "triton"), id=d) for d in ("cpu", "cuda")])
def test_opcheck_triton_ops_with_padded_residual(device):
    """Schemas, fake shapes (grad_residual has the residual's channels) and
    autograd of the Triton ops with a channel offset."""
    x, w, scale, shift = _block_input(torch.channels_last, device=device)
    shortcut = x[:, :, ::2, ::2]
    torch.library.opcheck(
        torch.ops.resnet_fused.triton_conv_bn_act, (x, w, scale, shift, shortcut, True, [2, 2], [1, 1], [1, 1], 1, 4)
    )
    y = torch.randn(2, 16, 5, 5, device=device)
    for r in (shortcut.clone().requires_grad_(), shortcut):
        torch.library.opcheck(
            torch.ops.resnet_fused.triton_batch_norm_act_fwd,
            (y.clone().requires_grad_(), torch.rand(16, device=device) + 0.5, torch.randn(16, device=device), 1e-5, r,
             True, 4),
        )
    out, mean, invstd, _ = torch.ops.resnet_fused.triton_batch_norm_act_fwd(y, None, None, 1e-5, shortcut, True, 4)
    grads = torch.ops.resnet_fused.triton_batch_norm_act_bwd(torch.randn_like(y), y, out, None, mean, invstd, True,
                                                             True, 8, 4)
    assert grads[3].shape == (2, 8, 5, 5)
    torch.library.opcheck(
        torch.ops.resnet_fused.triton_batch_norm_act_bwd, (torch.randn_like(y), y, out, None, mean, invstd, True, True, 8, 4)
    )
