"""The float64 references agree with torch's own ops (run in float64) and with textbook math."""

import pytest
import torch
import torch.nn.functional as F

from distnorm.functional.reference import add_rms_norm_ref, batch_norm_ref, layer_norm_ref, rms_norm_ref


@pytest.mark.parametrize("shape", [(4, 10), (2, 3, 65)])
def test_layer_norm_ref_matches_torch(shape):
    x = torch.randn(shape, dtype=torch.float64)
    w, b = torch.randn(shape[-1], dtype=torch.float64), torch.randn(shape[-1], dtype=torch.float64)
    torch.testing.assert_close(layer_norm_ref(x, w, b, 1e-5), F.layer_norm(x, shape[-1:], w, b, 1e-5), rtol=0, atol=1e-12)
    torch.testing.assert_close(
        layer_norm_ref(x, w - 1, b, 1e-5, zero_centered_gamma=True, output_scale=0.5),
        0.5 * F.layer_norm(x, shape[-1:], w, b, 1e-5), rtol=0, atol=1e-12,
    )


def test_layer_norm_ref_large_mean():
    x = 1e4 + torch.randn(8, 64, dtype=torch.float64)  # |mean|/std = 1e4: two-pass stays exact
    y = layer_norm_ref(x)
    torch.testing.assert_close(y, F.layer_norm(x, (64,)), rtol=0, atol=1e-9)


@pytest.mark.parametrize("shape", [(4, 10), (2, 3, 65)])
def test_rms_norm_ref_matches_torch(shape):
    x = torch.randn(shape, dtype=torch.float64)
    w = torch.randn(shape[-1], dtype=torch.float64)
    torch.testing.assert_close(rms_norm_ref(x, w, 1e-6), F.rms_norm(x, shape[-1:], w, 1e-6), rtol=0, atol=1e-12)
    torch.testing.assert_close(rms_norm_ref(x, None, 1e-6, output_scale=2.0), 2 * F.rms_norm(x, shape[-1:], None, 1e-6))


def test_references_return_float64_and_differentiate():
    x = torch.randn(3, 8, dtype=torch.float32, requires_grad=True)
    y = rms_norm_ref(x)
    assert y.dtype == torch.float64
    y.sum().backward()
    assert x.grad is not None and x.grad.dtype == torch.float32


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("shape,channel_dim", [((6, 4, 5, 5), 1), ((3, 7, 4), -1), ((6, 4), 1)])
def test_batch_norm_ref_matches_torch(shape, channel_dim, momentum):
    x = torch.randn(shape, dtype=torch.float64)
    c = shape[channel_dim]
    bn = torch.nn.BatchNorm1d(c, momentum=momentum, dtype=torch.float64) if len(shape) < 4 else torch.nn.BatchNorm2d(c, momentum=momentum, dtype=torch.float64)
    with torch.no_grad():
        bn.weight.normal_()
        bn.bias.normal_()
    rm, rv = bn.running_mean.clone(), bn.running_var.clone()
    tracked = 0
    for _ in range(3):  # several steps: running stats must track torch's exactly
        y, rm, rv = batch_norm_ref(x, rm, rv, bn.weight, bn.bias, training=True, momentum=momentum,
                                   num_batches_tracked=tracked, channel_dim=channel_dim)
        tracked += 1
        x_bn = x.movedim(channel_dim, 1) if channel_dim != 1 else x
        expected = bn(x_bn)
        expected = expected.movedim(1, channel_dim) if channel_dim != 1 else expected
        torch.testing.assert_close(y, expected, rtol=0, atol=1e-12)
        torch.testing.assert_close(rm, bn.running_mean, rtol=0, atol=1e-12)
        torch.testing.assert_close(rv, bn.running_var, rtol=0, atol=1e-12)
    bn.eval()
    y_eval, rm2, rv2 = batch_norm_ref(x, rm, rv, bn.weight, bn.bias, training=False, channel_dim=channel_dim)
    x_bn = x.movedim(channel_dim, 1) if channel_dim != 1 else x
    expected = bn(x_bn)
    expected = expected.movedim(1, channel_dim) if channel_dim != 1 else expected
    torch.testing.assert_close(y_eval, expected, rtol=0, atol=1e-12)
    assert torch.equal(rm2, rm) and torch.equal(rv2, rv)


def test_batch_norm_ref_mask_equals_dropping_padded_rows():
    x = torch.randn(2, 5, 3, dtype=torch.float64)  # [B, T, C]
    mask = torch.tensor([[True, True, True, False, False], [True, True, True, True, False]])
    rm, rv = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    y, rm1, rv1 = batch_norm_ref(x, rm, rv, channel_dim=-1, mask=mask)
    real = x[mask]  # [7, C]
    y2, rm2, rv2 = batch_norm_ref(real, rm, rv, channel_dim=-1)
    torch.testing.assert_close(y[mask], y2, rtol=0, atol=1e-12)
    torch.testing.assert_close(rm1, rm2, rtol=0, atol=0)
    torch.testing.assert_close(rv1, rv2, rtol=0, atol=0)


def test_add_rms_norm_ref_is_rms_norm_of_the_float64_sum():
    x, r = torch.randn(3, 8, dtype=torch.bfloat16), torch.randn(3, 8, dtype=torch.bfloat16)
    w = torch.randn(8)
    y, s = add_rms_norm_ref(x, r, w, 1e-6, zero_centered_gamma=True, output_scale=0.5)
    assert y.dtype == s.dtype == torch.float64
    torch.testing.assert_close(s, x.double() + r.double(), rtol=0, atol=0)
    torch.testing.assert_close(y, rms_norm_ref(s, w, 1e-6, zero_centered_gamma=True, output_scale=0.5), rtol=0, atol=0)
