import pytest
import torch

from conftest import GaussianDenoiser
from difflab import Cond
from difflab.guidance import ClassifierFreeGuidance
from difflab.nn import UNet


@pytest.mark.parametrize("dims,shape", [(1, (2, 3, 16)), (2, (2, 3, 8, 12)), (3, (2, 3, 4, 8, 8))])
def test_unet_shapes_any_dims(dims, shape):
    torch.manual_seed(0)
    net = UNet(3, channels=16, channel_mult=(1, 2), num_res_blocks=1, head_dim=8, groups=4, dims=dims)
    out = net(torch.randn(shape), torch.rand(2) * 999)
    assert out.shape == shape and torch.isfinite(out).all()


def test_unet_time_and_label_change_output_and_null_class_exists():
    torch.manual_seed(0)
    net = UNet(1, channels=16, channel_mult=(1, 2), num_res_blocks=1, head_dim=8, groups=4, num_classes=10).eval()
    for p in net.conv_out.parameters():  # keep the output path non-degenerate
        torch.nn.init.normal_(p, std=0.1)
    x = torch.randn(2, 1, 8, 8)
    a = net(x, torch.tensor([10.0, 10.0]), Cond(labels=torch.tensor([1, 1])))
    b = net(x, torch.tensor([500.0, 500.0]), Cond(labels=torch.tensor([1, 1])))
    c = net(x, torch.tensor([10.0, 10.0]), Cond(labels=torch.tensor([10, 10])))  # null class
    assert not torch.allclose(a, b) and not torch.allclose(a, c)


def test_unet_input_errors():
    net = UNet(1, channels=16, channel_mult=(1, 2, 2), num_res_blocks=1, head_dim=8, groups=4, num_classes=10)
    with pytest.raises(ValueError, match=r"expects input of shape \(B, 1, S, S\), got \(2, 3, 8, 8\)"):
        net(torch.randn(2, 3, 8, 8), torch.zeros(2), Cond(labels=torch.zeros(2, dtype=torch.long)))
    with pytest.raises(ValueError, match="divisible by 4"):
        net(torch.randn(2, 1, 6, 8), torch.zeros(2), Cond(labels=torch.zeros(2, dtype=torch.long)))
    with pytest.raises(ValueError, match="class-conditional"):
        net(torch.randn(2, 1, 8, 8), torch.zeros(2))
    with pytest.raises(ValueError, match="not divisible by head_dim"):
        UNet(1, channels=24, head_dim=32, groups=8)


class LabelShift(torch.nn.Module):
    """A conditional toy denoiser: x0_hat = D_gauss(x) + label."""

    def forward(self, x, sigma, cond):
        return GaussianDenoiser()(x, sigma) + cond.labels.view(-1, 1).to(x.dtype)


def test_cfg_scales_and_batching():
    x = torch.randn(4, 3, dtype=torch.float64)
    sigma = torch.full((4,), 2.0, dtype=torch.float64)
    cond = Cond(labels=torch.tensor([1, 2, 3, 4]))
    null = Cond(labels=torch.tensor([0]))
    den = LabelShift()
    cond_out, null_out = den(x, sigma, cond), den(x, sigma, null.expand(4))
    torch.testing.assert_close(ClassifierFreeGuidance(den, 1.0, null)(x, sigma, cond), cond_out)
    torch.testing.assert_close(ClassifierFreeGuidance(den, 0.0, null)(x, sigma, cond), null_out)
    torch.testing.assert_close(ClassifierFreeGuidance(den, 3.0, null)(x, sigma, cond),
                               null_out + 3.0 * (cond_out - null_out))


def test_cond_cat_index_expand():
    a, b = Cond(labels=torch.tensor([1, 2])), Cond(labels=torch.tensor([3]))
    assert a.cat(b).labels.tolist() == [1, 2, 3]
    assert a[1:].labels.tolist() == [2]
    assert b.expand(3).labels.tolist() == [3, 3, 3]
    with pytest.raises(ValueError, match="field 'labels' is set in only one"):
        a.cat(Cond())
