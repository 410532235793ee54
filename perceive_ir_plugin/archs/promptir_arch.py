"""PromptIR (Potlapalli et al., NeurIPS 2023) as a BasicSR arch.

Same constructor arguments, defaults, submodule names and numerics as the official
``va1shn9v/PromptIR:net/model.py``. The released Lightning checkpoint stores these keys
under ``state_dict`` with a ``net.`` prefix; ``perceive_ir_plugin.utils.checkpoint``
strips it, after which it loads with ``strict=True`` into ``PromptIR(decoder=True)``.

Faithful quirks of the official network, kept for checkpoint compatibility:

* the prompt branch widths are hard-coded for ``dim=48`` (prompt dims 64/128/320, sizes
  64/32/16, linear in-dims 96/192/384, and the matching ``noise_level*`` /
  ``reduce_*`` widths), so only ``dim=48`` can run a forward pass;
* ``chnl_reduce1-3`` and ``reduce_noise_channel_1-3`` are built (they are in the
  checkpoint) but never used by ``forward``; here they are created with
  ``requires_grad=False`` so DDP needs no ``find_unused_parameters``;
* with ``decoder=False`` (the constructor default) the network builds, but the official
  forward crashes with a channel mismatch at ``up4_3``; here it raises a clear error.
  Every official script uses ``decoder=True``.
"""
import torch
from torch import nn as nn
from torch.nn import functional as F

from basicsr.utils.registry import ARCH_REGISTRY
from perceive_ir_plugin.archs.arch_util import (Downsample, OverlapPatchEmbed, TransformerBlock, Upsample,
                                                check_size_multiple, transformer_stage)

# Official hard-coded prompt settings per decoder level: (prompt_dim, prompt_len, prompt_size, lin_dim).
PROMPT_SETTINGS = {
    1: (64, 5, 64, 96),
    2: (128, 5, 32, 192),
    3: (320, 5, 16, 384),
}
# The only embedding width for which the hard-coded widths above fit together.
RUNNABLE_DIM = 48


class PromptGenBlock(nn.Module):
    """Prompt generation block: an input-conditioned mix of learnable prompt components.

    The input is averaged over space, a linear layer and a softmax give one weight per
    component, the weighted sum of the ``prompt_len`` components is resized bilinearly
    (``align_corners=False``) to the input size and passed through a 3x3 conv.

    Args:
        prompt_dim (int): Channels of each prompt component.
        prompt_len (int): Number of components.
        prompt_size (int): Spatial size S of the stored components.
        lin_dim (int): Channels of the input features.

    Attributes:
        prompt_param (Parameter): (1, prompt_len, prompt_dim, S, S), initialised U[0, 1).
    """

    def __init__(self, prompt_dim=128, prompt_len=5, prompt_size=96, lin_dim=192):
        super().__init__()
        self.prompt_param = nn.Parameter(torch.rand(1, prompt_len, prompt_dim, prompt_size, prompt_size))
        self.linear_layer = nn.Linear(lin_dim, prompt_len)
        self.conv3x3 = nn.Conv2d(prompt_dim, prompt_dim, kernel_size=3, padding=1, bias=False)

    def forward(self, x):
        """(B, lin_dim, H, W) features -> (B, prompt_dim, H, W) prompt."""
        weights = torch.softmax(self.linear_layer(x.mean(dim=(-2, -1))), dim=1)  # (B, prompt_len)
        prompt = (weights[:, :, None, None, None] * self.prompt_param).sum(dim=1)
        prompt = F.interpolate(prompt, size=x.shape[-2:], mode='bilinear', align_corners=False)
        return self.conv3x3(prompt)


@ARCH_REGISTRY.register()
class PromptIR(nn.Module):
    """PromptIR: Restormer encoder-decoder with prompt blocks at decoder levels 3, 2 and 1.

    At each of the three lowest decoder resolutions, a :class:`PromptGenBlock` prompt is
    concatenated to the features, a transformer block (``noise_level{3,2,1}``) runs on the
    concatenation and a 1x1 conv (``reduce_noise_level{3,2,1}``) reduces the channels.

    Args:
        inp_channels (int): Input channels.
        out_channels (int): Output channels.
        dim (int): Channels of level 1 (must be 48 to run, see the module docstring).
        num_blocks (list[int]): Transformer blocks of levels 1, 2, 3 and the latent.
        num_refinement_blocks (int): Transformer blocks of the refinement stage.
        heads (list[int]): Attention heads per level.
        ffn_expansion_factor (float): GDFN hidden width factor.
        bias (bool): Conv biases.
        LayerNorm_type (str): ``'WithBias'`` or ``'BiasFree'``.
        decoder (bool): Build the prompt blocks and use them (True for the released model).

    Shapes:
        ``forward``: (B, inp_channels, H, W) RGB [0, 1] -> (B, out_channels, H, W), H and W
        multiples of 8 (``size_multiple``).
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
                 decoder=False):
        super().__init__()
        num_blocks, heads = list(num_blocks), list(heads)
        if len(num_blocks) != 4 or len(heads) != 4:
            raise ValueError(f'PromptIR: num_blocks and heads need 4 entries (levels 1-3 and latent), '
                             f'got num_blocks={num_blocks}, heads={heads}.')
        self.dim = dim
        dims = [dim, dim * 2, dim * 4, dim * 8]

        def stage(n, channels, n_heads):
            return transformer_stage(n, channels, n_heads, ffn_expansion_factor, bias, LayerNorm_type)

        def block(channels):  # the prompt-fusion blocks all use heads[2], as officially
            return TransformerBlock(channels, heads[2], ffn_expansion_factor, bias, LayerNorm_type)

        def conv1x1(c_in, c_out):
            return nn.Conv2d(c_in, c_out, kernel_size=1, bias=bias)

        # Attribute creation order = official state-dict key order.
        self.patch_embed = OverlapPatchEmbed(inp_channels, dim)
        self.decoder = decoder
        if decoder:
            self.prompt1 = PromptGenBlock(*PROMPT_SETTINGS[1])
            self.prompt2 = PromptGenBlock(*PROMPT_SETTINGS[2])
            self.prompt3 = PromptGenBlock(*PROMPT_SETTINGS[3])
        # Unused by forward (present in the official checkpoints).
        self.chnl_reduce1 = conv1x1(64, 64)
        self.chnl_reduce2 = conv1x1(128, 128)
        self.chnl_reduce3 = conv1x1(320, 256)

        self.reduce_noise_channel_1 = conv1x1(dims[0] + 64, dims[0])  # unused
        self.encoder_level1 = stage(num_blocks[0], dims[0], heads[0])
        self.down1_2 = Downsample(dims[0])
        self.reduce_noise_channel_2 = conv1x1(dims[1] + 128, dims[1])  # unused
        self.encoder_level2 = stage(num_blocks[1], dims[1], heads[1])
        self.down2_3 = Downsample(dims[1])
        self.reduce_noise_channel_3 = conv1x1(dims[2] + 256, dims[2])  # unused
        self.encoder_level3 = stage(num_blocks[2], dims[2], heads[2])
        self.down3_4 = Downsample(dims[2])
        self.latent = stage(num_blocks[3], dims[3], heads[3])

        # Decoder widths are the official literals: with dim=48 they are latent (384) + prompt3 (320) = 192 + 512,
        # level-3 output (192) + prompt2 (128) = 96 + 224, level-2 output (96) + prompt1 (64).
        self.up4_3 = Upsample(dims[2])
        self.reduce_chan_level3 = conv1x1(dims[1] + 192, dims[2])
        self.noise_level3 = block(dims[2] + 512)
        self.reduce_noise_level3 = conv1x1(dims[2] + 512, dims[2])
        self.decoder_level3 = stage(num_blocks[2], dims[2], heads[2])

        self.up3_2 = Upsample(dims[2])
        self.reduce_chan_level2 = conv1x1(dims[2], dims[1])
        self.noise_level2 = block(dims[1] + 224)
        self.reduce_noise_level2 = conv1x1(dims[1] + 224, dims[2])
        self.decoder_level2 = stage(num_blocks[1], dims[1], heads[1])

        self.up2_1 = Upsample(dims[1])
        self.noise_level1 = block(dims[1] + 64)
        self.reduce_noise_level1 = conv1x1(dims[1] + 64, dims[1])
        self.decoder_level1 = stage(num_blocks[0], dims[1], heads[0])

        self.refinement = stage(num_refinement_blocks, dims[1], heads[0])
        self.output = nn.Conv2d(dims[1], out_channels, kernel_size=3, padding=1, bias=bias)

        for name in self.unused_module_names():
            getattr(self, name).requires_grad_(False)

    @staticmethod
    def unused_module_names():
        """Names of the submodules that exist in the checkpoints but never run.

        Returns:
            tuple[str]: ``chnl_reduce1-3`` and ``reduce_noise_channel_1-3``.
        """
        return ('chnl_reduce1', 'chnl_reduce2', 'chnl_reduce3', 'reduce_noise_channel_1', 'reduce_noise_channel_2',
                'reduce_noise_channel_3')

    def _check_runnable(self, inp_img):
        if not self.decoder:
            raise RuntimeError('PromptIR(decoder=False) cannot run forward: as in the official code, up4_3 expects '
                               f'{self.dim * 4} channels, which only the prompt decoder provides (the latent has '
                               f'{self.dim * 8}). Build it with decoder: true, as the official scripts and the '
                               'released checkpoint do.')
        if self.dim != RUNNABLE_DIM:
            raise RuntimeError(f'PromptIR(dim={self.dim}) cannot run forward: the official prompt branch widths are '
                               f'hard-coded for dim={RUNNABLE_DIM}.')
        check_size_multiple(inp_img, self.size_multiple, type(self).__name__)

    def _fuse_prompt(self, x, prompt_block, fusion_block, reduce):
        return reduce(fusion_block(torch.cat([x, prompt_block(x)], 1)))

    def forward(self, inp_img, noise_emb=None):
        """Restore a batch.

        Args:
            inp_img (Tensor): (B, inp_channels, H, W), H and W multiples of 8.
            noise_emb: Ignored; accepted because the official signature has it.

        Returns:
            Tensor: (B, out_channels, H, W).
        """
        self._check_runnable(inp_img)
        enc1 = self.encoder_level1(self.patch_embed(inp_img))
        enc2 = self.encoder_level2(self.down1_2(enc1))
        enc3 = self.encoder_level3(self.down2_3(enc2))
        x = self.latent(self.down3_4(enc3))

        x = self._fuse_prompt(x, self.prompt3, self.noise_level3, self.reduce_noise_level3)
        x = self.reduce_chan_level3(torch.cat([self.up4_3(x), enc3], 1))
        x = self.decoder_level3(x)

        x = self._fuse_prompt(x, self.prompt2, self.noise_level2, self.reduce_noise_level2)
        x = self.reduce_chan_level2(torch.cat([self.up3_2(x), enc2], 1))
        x = self.decoder_level2(x)

        x = self._fuse_prompt(x, self.prompt1, self.noise_level1, self.reduce_noise_level1)
        x = self.decoder_level1(torch.cat([self.up2_1(x), enc1], 1))
        x = self.refinement(x)
        return self.output(x) + inp_img
