"""NAFNet (Chen et al., ECCV 2022) and its TLC variant NAFNetLocal as BasicSR archs.

Same constructor arguments, defaults, submodule names and numerics as the official
``megvii-research/NAFNet:basicsr/models/archs/{NAFNet_arch,local_arch}.py``, so the
released ``NAFNet-{GoPro,SIDD,REDS}-width{32,64}.pth`` files (``{'params': state_dict}``)
load with ``strict=True`` into either class.
"""
import torch
from torch import nn as nn
from torch.nn import functional as F

from basicsr.utils.registry import ARCH_REGISTRY
from perceive_ir_plugin.archs.arch_util import LayerNorm2d, SimpleGate, pad_to_multiple


class NAFBlock(nn.Module):
    """Nonlinear-activation-free block.

    ``y = x + beta * conv3(SCA(SG(conv2(conv1(LN(x))))))`` followed by
    ``y + gamma * conv5(SG(conv4(LN(y))))``, where SG is :class:`SimpleGate` and SCA the
    simplified channel attention ``z * conv1x1(avgpool(z))`` (``sca.0`` pool, ``sca.1`` conv).
    ``beta`` and ``gamma`` start at zero, so a fresh block is the identity.

    Args:
        c (int): Channels C.
        DW_Expand (int): Width factor of the depthwise branch. Default: 2.
        FFN_Expand (int): Width factor of the feed-forward branch. Default: 2.
        drop_out_rate (float): Dropout after each branch (0 disables it). Default: 0.
    """

    def __init__(self, c, DW_Expand=2, FFN_Expand=2, drop_out_rate=0.):  # noqa: N803 (official names)
        super().__init__()
        dw_channel = c * DW_Expand
        ffn_channel = c * FFN_Expand
        self.conv1 = nn.Conv2d(c, dw_channel, kernel_size=1, bias=True)
        self.conv2 = nn.Conv2d(dw_channel, dw_channel, kernel_size=3, padding=1, groups=dw_channel, bias=True)
        self.conv3 = nn.Conv2d(dw_channel // 2, c, kernel_size=1, bias=True)
        self.sca = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Conv2d(dw_channel // 2, dw_channel // 2, kernel_size=1, bias=True))
        self.sg = SimpleGate()
        self.conv4 = nn.Conv2d(c, ffn_channel, kernel_size=1, bias=True)
        self.conv5 = nn.Conv2d(ffn_channel // 2, c, kernel_size=1, bias=True)
        self.norm1 = LayerNorm2d(c)
        self.norm2 = LayerNorm2d(c)
        self.dropout1 = nn.Dropout(drop_out_rate) if drop_out_rate > 0. else nn.Identity()
        self.dropout2 = nn.Dropout(drop_out_rate) if drop_out_rate > 0. else nn.Identity()
        self.beta = nn.Parameter(torch.zeros((1, c, 1, 1)))
        self.gamma = nn.Parameter(torch.zeros((1, c, 1, 1)))

    def forward(self, inp):
        """(B, C, H, W) -> (B, C, H, W)."""
        x = self.sg(self.conv2(self.conv1(self.norm1(inp))))
        x = self.conv3(x * self.sca(x))
        y = inp + self.dropout1(x) * self.beta
        x = self.conv5(self.sg(self.conv4(self.norm2(y))))
        return y + self.dropout2(x) * self.gamma


@ARCH_REGISTRY.register()
class NAFNet(nn.Module):
    """NAFNet: U-shaped stack of :class:`NAFBlock` with additive skips and a global residual.

    Each encoder stage (``enc_blk_nums[i]`` blocks) is followed by a 2x2 stride-2 conv that
    doubles the channels; the decoder stages each start with a 1x1 conv + PixelShuffle(2)
    that halves them, add the matching encoder output and run ``dec_blk_nums[i]`` blocks.

    The input is zero-padded at the bottom/right to a multiple of ``2 ** len(enc_blk_nums)``
    and the output cropped back, so any input size works (``size_multiple = 1``).

    Args:
        img_channel (int): Input and output channels.
        width (int): Channels of the first level.
        middle_blk_num (int): Blocks at the lowest resolution.
        enc_blk_nums (list[int]): Blocks per encoder level.
        dec_blk_nums (list[int]): Blocks per decoder level (same length as ``enc_blk_nums``).

    Shapes:
        ``forward``: (B, img_channel, H, W) -> (B, img_channel, H, W); RGB [0, 1] for the
        official checkpoints.
    """

    size_multiple = 1

    def __init__(self, img_channel=3, width=16, middle_blk_num=1, enc_blk_nums=[], dec_blk_nums=[]):  # noqa: B006
        super().__init__()
        self.intro = nn.Conv2d(img_channel, width, kernel_size=3, padding=1, bias=True)
        self.ending = nn.Conv2d(width, img_channel, kernel_size=3, padding=1, bias=True)
        self.encoders = nn.ModuleList()
        self.decoders = nn.ModuleList()
        # Registered here (before ups/downs) to keep the official state-dict key order.
        self.middle_blks = nn.Sequential()
        self.ups = nn.ModuleList()
        self.downs = nn.ModuleList()

        chan = width
        for num in enc_blk_nums:
            self.encoders.append(nn.Sequential(*[NAFBlock(chan) for _ in range(num)]))
            self.downs.append(nn.Conv2d(chan, 2 * chan, kernel_size=2, stride=2))
            chan *= 2
        for _ in range(middle_blk_num):
            self.middle_blks.append(NAFBlock(chan))
        for num in dec_blk_nums:
            self.ups.append(nn.Sequential(nn.Conv2d(chan, chan * 2, kernel_size=1, bias=False), nn.PixelShuffle(2)))
            chan //= 2
            self.decoders.append(nn.Sequential(*[NAFBlock(chan) for _ in range(num)]))

        self.padder_size = 2**len(self.encoders)

    def forward(self, inp):
        """Restore a batch of any spatial size.

        Args:
            inp (Tensor): (B, img_channel, H, W).

        Returns:
            Tensor: (B, img_channel, H, W).
        """
        inp, (h, w) = pad_to_multiple(inp, self.padder_size, mode='constant')
        x = self.intro(inp)
        skips = []
        for encoder, down in zip(self.encoders, self.downs):
            x = encoder(x)
            skips.append(x)
            x = down(x)
        x = self.middle_blks(x)
        for decoder, up, skip in zip(self.decoders, self.ups, skips[::-1]):
            x = decoder(up(x) + skip)
        x = self.ending(x) + inp
        return x[:, :, :h, :w]


class LocalAvgPool2d(nn.Module):
    """TLC's test-time local average pooling (official ``local_arch.AvgPool2d``).

    Replaces the global average pooling of the simplified channel attention. Each pixel
    gets the mean of the ``kernel_size`` window around it (computed with an integral image;
    windows are "valid" windows, and the border rows/columns replicate the nearest valid
    mean). When the window covers the whole feature map this is exactly the global pooling
    and a (B, C, 1, 1) tensor is returned, as in training.

    Args:
        kernel_size (tuple[int, int]): Window (kh, kw), fixed from the training size.
        fast_imp (bool): The official *non-equivalent* faster approximation (sub-sampled
            integral image, nearest up-sampling). Default: False.
        max_reduction (tuple[int, int]): Largest sub-sampling factors the fast variant may
            use (official ``max_r1``, ``max_r2``).
    """

    _REDUCTIONS = (5, 4, 3, 2, 1)

    def __init__(self, kernel_size, fast_imp=False, max_reduction=(5, 5)):
        super().__init__()
        self.kernel_size = tuple(int(k) for k in kernel_size)
        self.fast_imp = fast_imp
        self.max_reduction = tuple(int(r) for r in max_reduction)

    def extra_repr(self):
        return f'kernel_size={self.kernel_size}, fast_imp={self.fast_imp}'

    def forward(self, x):
        """(B, C, H, W) -> (B, C, H, W), or (B, C, 1, 1) when the window covers the map."""
        h, w = x.shape[-2:]
        kh, kw = self.kernel_size
        if kh >= h and kw >= w:
            return F.adaptive_avg_pool2d(x, 1)
        out = self._fast_local_mean(x) if self.fast_imp else self._local_mean(x, min(h, kh), min(w, kw))
        oh, ow = out.shape[-2:]
        pad = ((w - ow) // 2, (w - ow + 1) // 2, (h - oh) // 2, (h - oh + 1) // 2)
        return F.pad(out, pad, mode='replicate')

    @staticmethod
    def _local_mean(x, kh, kw):
        """Means of every valid kh x kw window: (B, C, H - kh + 1, W - kw + 1)."""
        # Centring per channel keeps the integral image small, so float32 cancellation error
        # stays negligible on large images; the window means are unchanged mathematically.
        offset = x.mean(dim=(-2, -1), keepdim=True)
        s = F.pad((x - offset).cumsum(dim=-1).cumsum(dim=-2), (1, 0, 1, 0))
        box = s[..., kh:, kw:] - s[..., :-kh, kw:] - s[..., kh:, :-kw] + s[..., :-kh, :-kw]
        return box / (kh * kw) + offset

    def _fast_local_mean(self, x):
        """Official fast approximation: window means on a strided sub-sample, nearest up-sampled."""
        h, w = x.shape[-2:]
        r1 = min(self.max_reduction[0], next(r for r in self._REDUCTIONS if h % r == 0))
        r2 = min(self.max_reduction[1], next(r for r in self._REDUCTIONS if w % r == 0))
        s = x[:, :, ::r1, ::r2].cumsum(dim=-1).cumsum(dim=-2)
        hs, ws = s.shape[-2:]
        k1 = min(hs - 1, self.kernel_size[0] // r1)
        k2 = min(ws - 1, self.kernel_size[1] // r2)
        box = s[..., k1:, k2:] - s[..., :-k1, k2:] - s[..., k1:, :-k2] + s[..., :-k1, :-k2]
        return F.interpolate(box / (k1 * k2), scale_factor=(r1, r2))


@ARCH_REGISTRY.register()
class NAFNetLocal(NAFNet):
    """NAFNet with TLC (test-time local converter, Chu et al. 2022), used for GoPro / REDS.

    Every global average pooling of the simplified channel attention is replaced by a
    :class:`LocalAvgPool2d` whose window is the training-time feature map scaled by 1.5
    (``base_size = int(1.5 * H_train), int(1.5 * W_train)``). The window of a block at level
    ``l`` is ``(Hp / 2**l) * base_h // H_train`` (``Hp`` = ``H_train`` zero-padded to the
    network's multiple), exactly what the official constructor's dummy forward fixes; here
    it is computed directly, without running the network. As in the official code the local
    pooling is used in train and eval mode alike; it equals the global pooling of
    :class:`NAFNet` whenever the window covers the feature map, i.e. for inputs whose padded
    size is at most ``base_size`` (training crops of ``train_size`` in particular).

    No parameters or buffers are added: the state dict is that of :class:`NAFNet`.

    Args:
        img_channel, width, middle_blk_num, enc_blk_nums, dec_blk_nums: As :class:`NAFNet`.
        train_size (tuple[int]): ``(N, C, H, W)`` training input size (only H and W matter).
            Keyword-only. Default: (1, 3, 256, 256).
        fast_imp (bool): Use the official faster, non-equivalent local pooling. Keyword-only.
            Default: False.
    """

    def __init__(self,
                 img_channel=3,
                 width=16,
                 middle_blk_num=1,
                 enc_blk_nums=[],  # noqa: B006 (official defaults, never mutated)
                 dec_blk_nums=[],  # noqa: B006
                 *,
                 train_size=(1, 3, 256, 256),
                 fast_imp=False):
        super().__init__(img_channel, width, middle_blk_num, enc_blk_nums, dec_blk_nums)
        train_size = tuple(int(s) for s in train_size)
        if len(train_size) != 4 or min(train_size[-2:]) < 1:
            raise ValueError(f'NAFNetLocal: train_size must be (N, C, H, W) with H, W >= 1, got {train_size}.')
        self.train_size = train_size
        self.fast_imp = fast_imp
        self.base_size = (int(train_size[-2] * 1.5), int(train_size[-1] * 1.5))
        self._convert_pools()
        # The official constructor leaves the network in eval mode (BasicSR's model sets the mode anyway).
        self.eval()

    def _convert_pools(self):
        """Swap each block's ``sca[0]`` global pool for a :class:`LocalAvgPool2d`."""
        train_h, train_w = self.train_size[-2:]
        pad_h = -train_h % self.padder_size
        pad_w = -train_w % self.padder_size
        num_levels = len(self.encoders)
        stages = [(level, stage) for level, stage in enumerate(self.encoders)]
        stages.append((num_levels, self.middle_blks))
        # Decoders beyond the number of encoders are never run (as officially): clamp their level.
        stages += [(max(num_levels - 1 - i, 0), stage) for i, stage in enumerate(self.decoders)]
        for level, stage in stages:
            feat_h, feat_w = (train_h + pad_h) >> level, (train_w + pad_w) >> level
            kernel = (feat_h * self.base_size[0] // train_h, feat_w * self.base_size[1] // train_w)
            max_reduction = (max(1, 5 * feat_h // train_h), max(1, 5 * feat_w // train_w))
            for block in stage:
                block.sca[0] = LocalAvgPool2d(kernel, fast_imp=self.fast_imp, max_reduction=max_reduction)
