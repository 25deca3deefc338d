"""The paper's 3D residual UNet (Bone, Ammari et al. 2022, "Deep network architecture", Figure 2).

The network maps four co-registered, normalised modalities (T1, T2-FLAIR, ADC and a
post-contrast T1: T1c-low while training, the routine T1c at test time) to one image in [0, 1]:

* an encoding path that alternates residual modules and 2x2x2 strided downsampling
  convolutions, and a symmetric decoding path that alternates 2x2x2 transposed-convolution
  upsampling and residual modules;
* short skips are additions (inside each residual module), long skips concatenate the encoder
  features of the same resolution into the decoder;
* every kernel is 3x3x3 except the 2x2x2 down/up-sampling ones and the final 1x1x1 convolution;
* every activation is LeakyReLU(0.2) except the final sigmoid.

The paper does not list the channel widths or the number of resolution levels; they are
constructor parameters stored in the model bundle (defaults: 16 base channels doubling per
level, 4 levels, i.e. 16-32-64-128 channels and 3 downsamplings).

Tensors are ``(N, C, D, H, W)``; any spatial size works: :class:`ResidualUNet3D` pads the input
with zeros to a multiple of ``2 ** (levels - 1)`` (the background value of the normalised
images) and crops the output back, so crops of odd sizes and their mirrorings keep their shape.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

#: Name stored in bundles so a loader can refuse an architecture it does not know.
ARCHITECTURE = "residual_unet_3d"

#: Clamp of the post-contrast input before its logit (``input_skip``): 1e-3 -> logit +-6.9.
INPUT_SKIP_EPS = 1e-3


@dataclass(frozen=True)
class NetworkConfig:
    """Hyper-parameters of :class:`ResidualUNet3D`, stored as ``network`` in ``bundle.json``.

    Attributes:
        in_channels: 4 input modalities (paper, Figure 1: T1, T2-FLAIR, ADC, post-contrast T1).
        out_channels: 1 output image (paper, Figure 2).
        base_channels: width of the first level; doubles at every level (not given in the paper).
        levels: number of resolutions (levels - 1 downsamplings; not given in the paper).
        negative_slope: LeakyReLU slope (paper: "0.2-LeakyReLU").
        input_skip: add the logit of the last input channel (the post-contrast T1) before the final
            sigmoid, with the 1x1x1 head initialised to zero, so an untrained network returns its
            post-contrast input and training learns the change. Our reading of Figure 2's caption
            ("a fourth contrast-enhanced sequence that is filtered and returned as an output"); off by
            default, i.e. the plain architecture of the text. It makes small CPU-trained models
            (the phantom demo) reach the identity baseline from the first step.
    """

    in_channels: int = 4
    out_channels: int = 1
    base_channels: int = 16
    levels: int = 4
    negative_slope: float = 0.2
    input_skip: bool = False

    def __post_init__(self) -> None:
        if self.levels < 1:
            raise ValueError(f"network levels must be >= 1 (got {self.levels})")
        if self.base_channels < 1 or self.in_channels < 1 or self.out_channels < 1:
            raise ValueError(f"network channel counts must be positive (got {self})")

    @property
    def widths(self) -> list[int]:
        """Channels per level, e.g. ``[16, 32, 64, 128]``."""
        return [self.base_channels * 2**level for level in range(self.levels)]

    @property
    def size_multiple(self) -> int:
        """Spatial sizes the convolutions need without padding: ``2 ** (levels - 1)``."""
        return 2 ** (self.levels - 1)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict with the architecture name (bundle ``network`` entry)."""
        return {"architecture": ARCHITECTURE, **asdict(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> NetworkConfig:
        """Inverse of :meth:`to_dict`; refuses an unknown architecture with a clear message."""
        data = dict(data)
        architecture = data.pop("architecture", ARCHITECTURE)
        if architecture != ARCHITECTURE:
            raise ValueError(
                f"network architecture {architecture!r} is not supported by this version (expected {ARCHITECTURE!r}); "
                "update SlicerContrastAmplifier or use a bundle made for it."
            )
        known = {name for name in cls.__dataclass_fields__}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown network parameters {unknown} in the bundle; known: {sorted(known)}")
        return cls(**data)


class ResidualModule(nn.Module):
    """Two 3x3x3 convolutions with an additive short skip (paper, Figure 2).

    ``out = LeakyReLU(shortcut + conv(LeakyReLU(conv(x))))``. In the decoder the input is the
    concatenation [upsampled, encoder features] (2c channels) and the shortcut is the upsampled
    half (c channels), so every kernel stays 3x3x3 as in the paper (no 1x1x1 projection).
    """

    def __init__(self, in_channels: int, out_channels: int, negative_slope: float):
        super().__init__()
        self.conv1 = nn.Conv3d(in_channels, out_channels, kernel_size=3, padding=1)
        self.conv2 = nn.Conv3d(out_channels, out_channels, kernel_size=3, padding=1)
        self.negative_slope = negative_slope

    def forward(self, x: torch.Tensor, shortcut: torch.Tensor) -> torch.Tensor:
        y = F.leaky_relu(self.conv1(x), self.negative_slope)
        return F.leaky_relu(shortcut + self.conv2(y), self.negative_slope)


class ResidualUNet3D(nn.Module):
    """3D residual UNet of Bone, Ammari et al. 2022 (Figure 2); see the module docstring.

    Args:
        config: widths, depth and slope; defaults to :class:`NetworkConfig`'s defaults.

    Example:
        >>> net = ResidualUNet3D(NetworkConfig(base_channels=8, levels=3))
        >>> net(torch.zeros(1, 4, 21, 30, 17)).shape
        torch.Size([1, 1, 21, 30, 17])
    """

    def __init__(self, config: Optional[NetworkConfig] = None):
        super().__init__()
        self.config = config or NetworkConfig()
        c = self.config
        widths = c.widths
        slope = c.negative_slope
        # Lifts the 4 modalities to the first level's width (3x3x3, as every non-sampling kernel).
        self.stem = nn.Conv3d(c.in_channels, widths[0], kernel_size=3, padding=1)
        self.encoders = nn.ModuleList(ResidualModule(w, w, slope) for w in widths)
        self.downs = nn.ModuleList(
            nn.Conv3d(widths[i], widths[i + 1], kernel_size=2, stride=2) for i in range(c.levels - 1)
        )
        self.ups = nn.ModuleList(
            nn.ConvTranspose3d(widths[i + 1], widths[i], kernel_size=2, stride=2) for i in range(c.levels - 1)
        )
        self.decoders = nn.ModuleList(ResidualModule(2 * widths[i], widths[i], slope) for i in range(c.levels - 1))
        self.head = nn.Conv3d(widths[0], c.out_channels, kernel_size=1)
        if c.input_skip:
            nn.init.zeros_(self.head.weight)
            assert self.head.bias is not None  # Conv3d's default bias=True
            nn.init.zeros_(self.head.bias)

    def _pad(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[slice, ...]]:
        m = self.config.size_multiple
        sizes = x.shape[2:]
        pads = [(-s) % m for s in sizes]
        if not any(pads):
            return x, ()
        # F.pad lists the last dimension first; split the padding on both sides of each axis.
        flat: list[int] = []
        for p in reversed(pads):
            flat += [p // 2, p - p // 2]
        crop = tuple(slice(p // 2, p // 2 + s) for p, s in zip(pads, sizes))
        return F.pad(x, flat), crop

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 5 or x.shape[1] != self.config.in_channels:
            raise ValueError(
                f"network input must be (N, {self.config.in_channels}, D, H, W); got {tuple(x.shape)}"
            )
        x, crop = self._pad(x)
        slope = self.config.negative_slope
        h = F.leaky_relu(self.stem(x), slope)
        skips: list[torch.Tensor] = []
        for level, encoder in enumerate(self.encoders):
            h = encoder(h, h)
            if level < len(self.downs):
                skips.append(h)
                h = F.leaky_relu(self.downs[level](h), slope)
        for level in reversed(range(len(self.ups))):
            up = F.leaky_relu(self.ups[level](h), slope)
            h = self.decoders[level](torch.cat([up, skips[level]], dim=1), up)
        logits = self.head(h)
        if self.config.input_skip:
            # logit of the post-contrast input; clamped so the [0, 1] extremes stay finite
            post = x[:, -1:].clamp(INPUT_SKIP_EPS, 1.0 - INPUT_SKIP_EPS)
            logits = logits + torch.log(post) - torch.log1p(-post)
        out = torch.sigmoid(logits)
        if crop:
            out = out[(slice(None), slice(None)) + crop]
        return out


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def build_network(config: Union[NetworkConfig, Mapping[str, Any], None] = None) -> ResidualUNet3D:
    """Create a network from a :class:`NetworkConfig` or a bundle's ``network`` dict."""
    if config is None or isinstance(config, NetworkConfig):
        return ResidualUNet3D(config)
    return ResidualUNet3D(NetworkConfig.from_dict(config))
