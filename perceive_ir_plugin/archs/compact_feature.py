"""Compact Feature Extraction (CFE, SPEC §6): degraded image -> L2-normalised degradation embedding Z."""
from torch import nn
from torch.nn import functional as F


class _ResidualBlock(nn.Module):
    """``x + Conv3×3(LReLU(Conv3×3(x)))`` (figure variant of the CFE)."""

    def __init__(self, channels):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.LeakyReLU(0.1, inplace=True),
                                  nn.Conv2d(channels, channels, 3, padding=1))

    def forward(self, x):
        return x + self.body(x)


class CompactFeatureExtractor(nn.Module):
    """Small degradation encoder giving Z (B, out_dim), L2-normalised.

    ``release`` (default, the authors' code, ≈0.2 M parameters): four 3×3 stride-2 convs
    ``in→32→64→96→128`` each followed by GELU (``body``), global average pooling, one
    ``Linear(128→out_dim)`` (``projection``), L2 normalisation.

    ``figure`` (paper figure: ResBlock, residual Conv–LReLU–Conv, AvgPool, Linear–LReLU–
    Linear): the figure gives no widths or strides, so ours are: 3×3 stride-2 stem
    ``in→64`` + LReLU, two residual blocks each followed by a 3×3 stride-2 conv + LReLU,
    global average pooling, ``Linear(64→out_dim)`` – LReLU – ``Linear(out_dim→out_dim)``,
    L2 normalisation.

    Args:
        in_channels (int): Input channels. Default: 3.
        channels (Sequence[int]): Widths of the four release convs. Default: (32, 64, 96, 128).
        out_dim (int): Length of Z. Default: 128.
        mode (str): ``'release'`` or ``'figure'``.
    """

    def __init__(self, in_channels=3, channels=(32, 64, 96, 128), out_dim=128, mode='release'):
        super().__init__()
        if mode not in ('release', 'figure'):
            raise ValueError(f"cfe_mode must be 'release' or 'figure', got '{mode}'.")
        self.mode = mode
        self.out_dim = out_dim
        if mode == 'release':
            layers, prev = [], in_channels
            for ch in channels:
                layers += [nn.Conv2d(prev, ch, 3, stride=2, padding=1), nn.GELU()]
                prev = ch
            self.body = nn.Sequential(*layers)
            self.projection = nn.Linear(prev, out_dim)
        else:
            width = 64
            act = nn.LeakyReLU(0.1, inplace=True)
            self.body = nn.Sequential(nn.Conv2d(in_channels, width, 3, stride=2, padding=1), act,
                                      _ResidualBlock(width), nn.Conv2d(width, width, 3, stride=2, padding=1), act,
                                      _ResidualBlock(width), nn.Conv2d(width, width, 3, stride=2, padding=1), act)
            self.projection = nn.Sequential(nn.Linear(width, out_dim), nn.LeakyReLU(0.1, inplace=True),
                                            nn.Linear(out_dim, out_dim))

    def forward(self, x):
        """Embed a degraded image.

        Args:
            x (Tensor): (B, 3, H, W) degraded image, RGB, [0, 1], full resolution.

        Returns:
            Tensor: (B, out_dim) Z with unit L2 norm.
        """
        pooled = self.body(x).mean(dim=(2, 3))
        return F.normalize(self.projection(pooled), dim=1)
