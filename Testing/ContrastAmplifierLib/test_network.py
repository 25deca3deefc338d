"""The paper's residual UNet: shapes, output range, odd sizes, mirroring, parameter count."""

from __future__ import annotations

import pytest
import torch

from ContrastAmplifierLib.network import ARCHITECTURE, NetworkConfig, ResidualUNet3D, build_network, count_parameters

torch.set_num_threads(1)


def test_default_network_matches_paper_layout_and_prints_parameter_count():
    net = ResidualUNet3D()
    config = net.config
    assert (config.in_channels, config.out_channels, config.negative_slope) == (4, 1, 0.2)
    assert config.widths == [16, 32, 64, 128]
    kernels = {tuple(m.kernel_size) for m in net.modules() if isinstance(m, (torch.nn.Conv3d, torch.nn.ConvTranspose3d))}
    assert kernels == {(3, 3, 3), (2, 2, 2), (1, 1, 1)}
    assert tuple(net.head.kernel_size) == (1, 1, 1)
    n = count_parameters(net)
    print(f"\nResidualUNet3D parameters: base 16 x 4 levels = {n:,}; "
          f"base 8 x 3 levels = {count_parameters(ResidualUNet3D(NetworkConfig(base_channels=8, levels=3))):,}")
    assert 1_000_000 < n < 3_000_000


@pytest.mark.parametrize("shape", [(32, 32, 32), (17, 23, 30), (9, 8, 15)])
def test_output_shape_and_range_at_any_size(shape):
    torch.manual_seed(0)
    net = ResidualUNet3D(NetworkConfig(base_channels=4, levels=4)).eval()
    with torch.no_grad():
        out = net(torch.rand((2, 4) + shape))
    assert out.shape == (2, 1) + shape
    assert torch.isfinite(out).all() and out.min() >= 0 and out.max() <= 1


def test_mirroring_keeps_shapes_and_inverse_flip_is_exact_at_odd_size():
    torch.manual_seed(0)
    net = ResidualUNet3D(NetworkConfig(base_channels=4, levels=3)).eval()
    x = torch.rand(1, 4, 13, 18, 11)
    with torch.no_grad():
        for dims in [(), (2,), (3,), (4,), (2, 3, 4)]:
            flipped = torch.flip(x, dims) if dims else x
            y = net(flipped)
            assert y.shape == (1, 1, 13, 18, 11)
            back = torch.flip(y, dims) if dims else y
            # The inverse flip restores the prediction of the flipped input exactly.
            assert torch.equal(torch.flip(back, dims) if dims else back, y)


def test_gradients_flow_to_every_parameter():
    torch.manual_seed(0)
    net = ResidualUNet3D(NetworkConfig(base_channels=4, levels=3))
    net(torch.rand(1, 4, 8, 8, 8)).mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())


def test_config_round_trip_and_clear_errors():
    config = NetworkConfig(base_channels=8, levels=3)
    data = config.to_dict()
    assert data["architecture"] == ARCHITECTURE
    assert NetworkConfig.from_dict(data) == config
    assert isinstance(build_network(data), ResidualUNet3D)
    with pytest.raises(ValueError, match="not supported"):
        NetworkConfig.from_dict({**data, "architecture": "vnet"})
    with pytest.raises(ValueError, match="unknown network parameters"):
        NetworkConfig.from_dict({**data, "dropout": 0.1})
    with pytest.raises(ValueError, match=r"\(N, 4, D, H, W\)"):
        ResidualUNet3D(config)(torch.zeros(1, 3, 8, 8, 8))


def test_input_skip_starts_as_the_identity_on_the_post_contrast_input():
    from ContrastAmplifierLib.network import INPUT_SKIP_EPS, NetworkConfig, build_network

    torch.manual_seed(0)
    net = build_network(NetworkConfig(base_channels=4, levels=3, input_skip=True)).eval()
    x = torch.rand(1, 4, 9, 12, 10)
    with torch.no_grad():
        out = net(x)
    expected = x[:, 3:].clamp(INPUT_SKIP_EPS, 1 - INPUT_SKIP_EPS)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    # it still trains: one gradient step moves the output away from the input
    loss = ((net(x) - 0.5) ** 2).mean()
    loss.backward()
    assert net.head.weight.grad.abs().sum() > 0
    # and round-trips through the bundle dict
    assert NetworkConfig.from_dict(net.config.to_dict()).input_skip is True
    assert NetworkConfig.from_dict({k: v for k, v in net.config.to_dict().items() if k != "input_skip"}).input_skip is False
