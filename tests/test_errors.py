"""Bad input gets a clear error naming the argument, at the model and the op level."""
import pytest
import torch

import resnet_fused
from resnet_fused import ops


@pytest.fixture(scope="module")
def model():
    return resnet_fused.resnet18().eval()


def test_model_wrong_rank(model):
    with pytest.raises(ValueError, match=r"x must be a 4-D \(N, C, H, W\) tensor, got 3-D"):
        model(torch.randn(3, 32, 32))


def test_model_integer_input(model):
    with pytest.raises(TypeError, match="x must be floating point.*got torch.uint8"):
        model(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))


def test_model_channel_mismatch(model):
    with pytest.raises(ValueError, match="x has 4 channels but weight expects 3"):
        model(torch.randn(1, 4, 32, 32))


def test_model_dtype_mismatch(model):
    with pytest.raises(TypeError, match="weight has dtype torch.float32 but x has torch.float64"):
        model(torch.randn(1, 3, 32, 32, dtype=torch.float64))


def conv_args(**over):
    args = dict(
        x=torch.randn(2, 8, 9, 9),
        weight=torch.randn(16, 8, 3, 3),
        scale=torch.rand(16),
        shift=torch.randn(16),
        residual=None,
        relu=True,
        stride=1,
        padding=1,
        dilation=1,
        groups=1,
    )
    args.update(over)
    return args


@pytest.mark.parametrize(
    "over, exc, pattern",
    [
        (dict(x=torch.randn(8, 9, 9)), ValueError, "x must be a 4-D"),
        (dict(weight=torch.randn(16, 8, 3)), ValueError, "weight must be a 4-D"),
        (dict(x=torch.ones(2, 8, 9, 9, dtype=torch.int32)), TypeError, "x must be floating point"),
        (dict(x=torch.randn(2, 7, 9, 9)), ValueError, "x has 7 channels but weight expects 8"),
        (dict(scale=torch.rand(15)), ValueError, r"scale must have shape \(16,\)"),
        (dict(shift=torch.rand(16, 1)), ValueError, r"shift must have shape \(16,\)"),
        (dict(scale=torch.ones(16, dtype=torch.int64)), TypeError, "scale must be floating point"),
        (dict(groups=3), ValueError, "groups=3 must divide the output channels"),
        (dict(groups=0), ValueError, "groups must be a positive int"),
        (dict(weight=torch.randn(16, 4, 3, 3), groups=4), ValueError, "x has 8 channels but weight expects 16"),
        (dict(stride=0), ValueError, "stride must be an int >= 1"),
        (dict(dilation=(1, 0)), ValueError, "dilation must be an int >= 1"),
        (dict(padding=-1), ValueError, "padding must be an int >= 0"),
        (dict(padding=0, dilation=5), ValueError, "too small for a 3x3 kernel"),
        (dict(residual=torch.randn(2, 16, 8, 8)), ValueError, r"residual must have the output's shape \(2, 16, 9, 9\)"),
        (dict(residual=torch.randn(2, 16, 9)), ValueError, "residual must be a 4-D"),
        (dict(weight=torch.randn(16, 8, 3, 3, device="meta")), ValueError, "weight is on meta but x is on cpu"),
        (dict(scale=torch.rand(16, device="meta")), ValueError, "scale is on meta but x is on cpu"),
        (dict(residual=torch.randn(2, 16, 9, 9, device="meta")), ValueError, "residual is on meta"),
        (dict(relu="no"), TypeError, "relu must be a bool, got str 'no'"),
        (dict(relu=1), TypeError, "relu must be a bool, got int 1"),
    ],
)
def test_conv_bn_act_bad_input(over, exc, pattern):
    with pytest.raises(exc, match=pattern):
        ops.conv_bn_act(**conv_args(**over))


def bn_args(**over):
    c = 6
    args = dict(
        x=torch.randn(2, c, 5, 5),
        weight=torch.rand(c),
        bias=torch.randn(c),
        running_mean=torch.zeros(c),
        running_var=torch.ones(c),
        training=True,
        momentum=0.1,
        eps=1e-5,
        residual=None,
        relu=True,
    )
    args.update(over)
    return args


@pytest.mark.parametrize(
    "over, exc, pattern",
    [
        (dict(x=torch.randn(2, 6, 5)), ValueError, "x must be a 4-D"),
        (dict(x=torch.ones(2, 6, 5, 5, dtype=torch.int64)), TypeError, "x must be floating point"),
        (dict(weight=torch.rand(5)), ValueError, r"weight must have shape \(6,\)"),
        (dict(bias=torch.rand(7)), ValueError, r"bias must have shape \(6,\)"),
        (dict(running_mean=torch.zeros(5)), ValueError, r"running_mean must have shape \(6,\)"),
        (dict(running_var=None), ValueError, "running_mean and running_var must both be tensors or both be None"),
        (dict(running_mean=None, running_var=None, training=False), ValueError, "training=False needs running_mean"),
        (dict(momentum=1.5), ValueError, r"momentum must be a float in \[0, 1\]"),
        (dict(eps=-1.0), ValueError, "eps must be a non-negative float"),
        (dict(residual=torch.randn(2, 6, 5, 4)), ValueError, "residual must have the output's shape"),
        (dict(weight=torch.rand(6, device="meta")), ValueError, "weight is on meta but x is on cpu"),
        (dict(x=torch.randn(1, 6, 1, 1)), ValueError, "Expected more than 1 value per channel when training"),
        (dict(eps=0.0), ValueError, r"eps must be positive in training \(as in F.batch_norm\), got 0.0"),
        (dict(relu="no"), TypeError, "relu must be a bool, got str 'no'"),
    ],
)
def test_batch_norm_act_bad_input(over, exc, pattern):
    with pytest.raises(exc, match=pattern):
        ops.batch_norm_act(**bn_args(**over))


def test_unknown_backend_name():
    with pytest.raises(ValueError, match="backend must be one of 'auto', 'eager', 'triton', 'cuda', 'cpu'; got 'fast'"):
        resnet_fused.set_backend("fast")
    with pytest.raises(ValueError, match="got 'cudnn'"):
        with resnet_fused.backend("cudnn"):
            pass


def test_eps_zero_is_refused_in_training_like_torch():
    """torch refuses eps=0 with batch statistics (a constant channel would
    divide by zero); in eval it is allowed, as in torch."""
    with pytest.raises(ValueError, match="eps must be positive"):
        torch.nn.functional.batch_norm(torch.randn(2, 6, 5, 5), None, None, training=True, eps=0.0)
    for f in (lambda: ops.batch_norm_act(**bn_args(eps=0.0)),
              lambda: ops.conv_bn_act_train(torch.randn(2, 3, 5, 5), torch.randn(6, 3, 1, 1), None, None, None,
                                            None, eps=0.0)):
        with pytest.raises(ValueError, match="eps must be positive in training"):
            f()
    out = ops.batch_norm_act(**bn_args(eps=0.0, training=False))
    ref = torch.relu(torch.nn.functional.batch_norm(
        bn_args()["x"], torch.zeros(6), torch.ones(6), bn_args()["weight"], bn_args()["bias"], False, 0.1, 0.0))
    assert out.shape == ref.shape


def test_conv_bn_act_train_relu_must_be_a_bool():
    with pytest.raises(TypeError, match="relu must be a bool"):
        ops.conv_bn_act_train(torch.randn(2, 3, 5, 5), torch.randn(6, 3, 1, 1), None, None, None, None, relu="no")
