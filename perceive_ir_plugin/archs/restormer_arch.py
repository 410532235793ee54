"""Restormer (Zamir et al., CVPR 2022) as a BasicSR arch.

Same constructor arguments, defaults, submodule names and numerics as the official
``swz30/Restormer:basicsr/models/archs/restormer_arch.py``, so the released ``.pth`` files
(``{'params': state_dict}``) load with ``strict=True``.
"""
import torch
from torch import nn as nn

from basicsr.utils.registry import ARCH_REGISTRY
from perceive_ir_plugin.archs.arch_util import (Downsample, OverlapPatchEmbed, Upsample, check_size_multiple,
                                                transformer_stage)


@ARCH_REGISTRY.register()
class Restormer(nn.Module):
    """Restormer: 4-level U-shaped transformer of MDTA + GDFN blocks with a global residual.

    Encoder levels 1-3 and the latent run ``num_blocks[0..3]`` transformer blocks at
    ``dim * 2**level`` channels; each decoder level up-samples, concatenates the encoder
    skip and (levels 3 and 2) reduces channels with a 1x1 conv; decoder level 1 and the
    refinement stage run at ``2 * dim`` channels. The output conv result is added to the
    input image, except in dual-pixel mode where the level-1 embedding enters through
    ``skip_conv`` instead and there is no input residual.

    Args:
        inp_channels (int): Input channels (6 for dual-pixel: left and right views).
        out_channels (int): Output channels.
        dim (int): Channels of level 1.
        num_blocks (list[int]): Transformer blocks of levels 1, 2, 3 and the latent.
        num_refinement_blocks (int): Transformer blocks of the refinement stage.
        heads (list[int]): Attention heads per level.
        ffn_expansion_factor (float): GDFN hidden width factor.
        bias (bool): Conv biases (False in every official config).
        LayerNorm_type (str): ``'WithBias'`` (deraining, deblurring) or ``'BiasFree'``
            (denoising checkpoints).
        dual_pixel_task (bool): Dual-pixel defocus deblurring mode (with ``inp_channels=6``).

    Shapes:
        ``forward``: (B, inp_channels, H, W) -> (B, out_channels, H, W), H and W multiples of
        8 (``size_multiple``). Value range and channel order are those of the training data
        (RGB, [0, 1] for the official checkpoints).
    """

    size_multiple = 8

    def __init__(self,
                 inp_channels=3,
                 out_channels=3,
                 dim=48,
                 num_blocks=[4, 6, 6, 8],  # noqa: B006 (official defaults, never mutated)
                 num_refinement_blocks=4,
                 heads=[1, 2, 4, 8],  # noqa: B006
                 ffn_expansion_factor=2.66,
                 bias=False,
                 LayerNorm_type='WithBias',  # noqa: N803 (official option name)
                 dual_pixel_task=False):
        super().__init__()
        num_blocks, heads = list(num_blocks), list(heads)
        if len(num_blocks) != 4 or len(heads) != 4:
            raise ValueError(f'Restormer: num_blocks and heads need 4 entries (levels 1-3 and latent), '
                             f'got num_blocks={num_blocks}, heads={heads}.')
        dims = [dim, dim * 2, dim * 4, dim * 8]

        def stage(n, channels, n_heads):
            return transformer_stage(n, channels, n_heads, ffn_expansion_factor, bias, LayerNorm_type)

        self.patch_embed = OverlapPatchEmbed(inp_channels, dim)
        self.encoder_level1 = stage(num_blocks[0], dims[0], heads[0])
        self.down1_2 = Downsample(dims[0])
        self.encoder_level2 = stage(num_blocks[1], dims[1], heads[1])
        self.down2_3 = Downsample(dims[1])
        self.encoder_level3 = stage(num_blocks[2], dims[2], heads[2])
        self.down3_4 = Downsample(dims[2])
        self.latent = stage(num_blocks[3], dims[3], heads[3])

        self.up4_3 = Upsample(dims[3])
        self.reduce_chan_level3 = nn.Conv2d(dims[3], dims[2], kernel_size=1, bias=bias)
        self.decoder_level3 = stage(num_blocks[2], dims[2], heads[2])
        self.up3_2 = Upsample(dims[2])
        self.reduce_chan_level2 = nn.Conv2d(dims[2], dims[1], kernel_size=1, bias=bias)
        self.decoder_level2 = stage(num_blocks[1], dims[1], heads[1])
        self.up2_1 = Upsample(dims[1])  # no channel reduction: level 1 decodes at 2 * dim
        self.decoder_level1 = stage(num_blocks[0], dims[1], heads[0])
        self.refinement = stage(num_refinement_blocks, dims[1], heads[0])

        self.dual_pixel_task = dual_pixel_task
        if dual_pixel_task:
            self.skip_conv = nn.Conv2d(dim, dims[1], kernel_size=1, bias=bias)
        self.output = nn.Conv2d(dims[1], out_channels, kernel_size=3, padding=1, bias=bias)

    def encode(self, inp_img):
        """Shallow features and the three encoder levels plus latent.

        Args:
            inp_img (Tensor): (B, inp_channels, H, W), H and W multiples of 8.

        Returns:
            tuple[Tensor]: ``(emb, enc1, enc2, enc3, latent)`` with channels
            dim, dim, 2dim, 4dim, 8dim at resolutions 1, 1, 1/2, 1/4, 1/8.
        """
        check_size_multiple(inp_img, self.size_multiple, type(self).__name__)
        emb = self.patch_embed(inp_img)
        enc1 = self.encoder_level1(emb)
        enc2 = self.encoder_level2(self.down1_2(enc1))
        enc3 = self.encoder_level3(self.down2_3(enc2))
        latent = self.latent(self.down3_4(enc3))
        return emb, enc1, enc2, enc3, latent

    def forward(self, inp_img):
        """Restore a batch.

        Args:
            inp_img (Tensor): (B, inp_channels, H, W), H and W multiples of 8.

        Returns:
            Tensor: (B, out_channels, H, W).
        """
        emb, enc1, enc2, enc3, latent = self.encode(inp_img)

        x = self.reduce_chan_level3(torch.cat([self.up4_3(latent), enc3], 1))
        x = self.decoder_level3(x)
        x = self.reduce_chan_level2(torch.cat([self.up3_2(x), enc2], 1))
        x = self.decoder_level2(x)
        x = self.decoder_level1(torch.cat([self.up2_1(x), enc1], 1))
        x = self.refinement(x)

        if self.dual_pixel_task:
            return self.output(x + self.skip_conv(emb))
        return self.output(x) + inp_img
