"""PerceiveIRNet: the Perceive-IR restoration branch with SGM, CFE and prior-guided decoder (SPEC §5-§7).

State-dict names follow the authors' 2026 release (SPEC §9.2): ``embed``, ``encoder1..3``,
``down1..3``, ``cfe.body``, ``cfe.projection``, ``pgm.{0..3}.affine.{0,2}``,
``latent.blocks.N``, ``up3/2/1``, ``reduce3/2/1``, ``decoder3/2/1.blocks.N``,
``refinement.N``, ``output``; inside blocks ``norm1.body``, ``attention.{temperature, qkv,
qkv_dw, project}`` (TB) or ``attention.{temperature, q.{0,1}, kv.{0,1}, project}`` (PGCA),
``guidance_norm``, ``mdta_norm``, ``mdta.*``, ``norm2``, ``ffn.{project_in, depthwise,
project_out}``. ``pgm.<i>`` guides decoder level i+1 (``pgm.3`` the latent). The frozen
DINOv2 is not part of the state dict (it has its own weight file, option ``sgm_weights``).
"""
import torch
from torch import nn

from basicsr.utils.registry import ARCH_REGISTRY
from perceive_ir_plugin.archs.arch_util import (ChannelLayerNorm, check_size_multiple, gelu_gate,
                                                transposed_attention)
from perceive_ir_plugin.archs.compact_feature import CompactFeatureExtractor
from perceive_ir_plugin.archs.semantic_guidance import (FrozenHolder, FrozenSGMMixin, PromptGuidance,
                                                         shared_semantic_encoder)


class MDTA(nn.Module):
    """Restormer's multi-Dconv transposed self-attention with the release's names.

    Args:
        dim (int): Channels C.
        num_heads (int): Heads (divide C).
        bias (bool): Conv biases.
    """

    def __init__(self, dim, num_heads, bias):
        super().__init__()
        self.num_heads = num_heads
        self.temperature = nn.Parameter(torch.ones(num_heads, 1, 1))
        self.qkv = nn.Conv2d(dim, dim * 3, 1, bias=bias)
        self.qkv_dw = nn.Conv2d(dim * 3, dim * 3, 3, padding=1, groups=dim * 3, bias=bias)
        self.project = nn.Conv2d(dim, dim, 1, bias=bias)

    def forward(self, x):
        """(B, C, H, W) -> (B, C, H, W)."""
        q, k, v = self.qkv_dw(self.qkv(x)).chunk(3, dim=1)
        return self.project(transposed_attention(q, k, v, self.num_heads, self.temperature))


class PGCA(nn.Module):
    """Prior-Guided Cross Attention: queries from the guidance Y, keys/values from x.

    Args:
        dim (int): Channels C.
        num_heads (int): Heads (divide C).
        bias (bool): Conv biases.
    """

    def __init__(self, dim, num_heads, bias):
        super().__init__()
        self.num_heads = num_heads
        self.temperature = nn.Parameter(torch.ones(num_heads, 1, 1))
        self.q = nn.Sequential(nn.Conv2d(dim, dim, 1, bias=bias),
                               nn.Conv2d(dim, dim, 3, padding=1, groups=dim, bias=bias))
        self.kv = nn.Sequential(nn.Conv2d(dim, dim * 2, 1, bias=bias),
                                nn.Conv2d(dim * 2, dim * 2, 3, padding=1, groups=dim * 2, bias=bias))
        self.project = nn.Conv2d(dim, dim, 1, bias=bias)

    def forward(self, x, guide):
        """Cross attention.

        Args:
            x (Tensor): (B, C, H, W) normalised features (keys, values).
            guide (Tensor): (B, C, H, W) normalised guidance (queries).

        Returns:
            Tensor: (B, C, H, W).
        """
        k, v = self.kv(x).chunk(2, dim=1)
        return self.project(transposed_attention(self.q(guide), k, v, self.num_heads, self.temperature))


class GDFN(nn.Module):
    """Restormer's gated-Dconv feed-forward network with the release's names.

    Args:
        dim (int): Channels C.
        ffn_expansion_factor (float): Hidden width h = int(C · factor).
        bias (bool): Conv biases.
    """

    def __init__(self, dim, ffn_expansion_factor, bias):
        super().__init__()
        hidden = int(dim * ffn_expansion_factor)
        self.project_in = nn.Conv2d(dim, hidden * 2, 1, bias=bias)
        self.depthwise = nn.Conv2d(hidden * 2, hidden * 2, 3, padding=1, groups=hidden * 2, bias=bias)
        self.project_out = nn.Conv2d(hidden, dim, 1, bias=bias)

    def forward(self, x):
        """(B, C, H, W) -> (B, C, H, W)."""
        return self.project_out(gelu_gate(self.depthwise(self.project_in(x))))


class TransformerBlock(nn.Module):
    """TB: ``x + MDTA(LN(x))`` then ``+ GDFN(LN(.))`` (encoder and refinement)."""

    def __init__(self, dim, num_heads, ffn_expansion_factor, bias, LayerNorm_type):  # noqa: N803
        super().__init__()
        self.norm1 = ChannelLayerNorm(dim, LayerNorm_type)
        self.attention = MDTA(dim, num_heads, bias)
        self.norm2 = ChannelLayerNorm(dim, LayerNorm_type)
        self.ffn = GDFN(dim, ffn_expansion_factor, bias)

    def forward(self, x):
        """(B, C, H, W) -> (B, C, H, W)."""
        x = x + self.attention(self.norm1(x))
        return x + self.ffn(self.norm2(x))


class EnhancedTransformerBlock(nn.Module):
    """ETB of the latent and decoder stages.

    ``release``: ``t = PGCA(LN(x), LN(Y))``; ``u = Y + MDTA(LN(t))``; ``out = u + GDFN(LN(u))``.
    ``figure`` (paper figure, SPEC §11.2): ``t = Y + PGCA(LN(x), LN(Y))``; ``out = t + GDFN(LN(t))``
    (no ``mdta``/``mdta_norm``).

    Args:
        dim, num_heads, ffn_expansion_factor, bias, LayerNorm_type: As in :class:`TransformerBlock`.
        mode (str): ``'release'`` or ``'figure'``.
    """

    def __init__(self, dim, num_heads, ffn_expansion_factor, bias, LayerNorm_type, mode='release'):  # noqa: N803
        super().__init__()
        if mode not in ('release', 'figure'):
            raise ValueError(f"etb_mode must be 'release' or 'figure', got '{mode}'.")
        self.mode = mode
        self.norm1 = ChannelLayerNorm(dim, LayerNorm_type)
        self.guidance_norm = ChannelLayerNorm(dim, LayerNorm_type)
        self.attention = PGCA(dim, num_heads, bias)
        if mode == 'release':
            self.mdta_norm = ChannelLayerNorm(dim, LayerNorm_type)
            self.mdta = MDTA(dim, num_heads, bias)
        self.norm2 = ChannelLayerNorm(dim, LayerNorm_type)
        self.ffn = GDFN(dim, ffn_expansion_factor, bias)

    def forward(self, x, guide):
        """(B, C, H, W) features and (B, C, H, W) guidance Y -> (B, C, H, W)."""
        t = self.attention(self.norm1(x), self.guidance_norm(guide))
        u = guide + (self.mdta(self.mdta_norm(t)) if self.mode == 'release' else t)
        return u + self.ffn(self.norm2(u))


class GuidedStage(nn.Module):
    """A stack of ETBs sharing one guidance map Y (``blocks.N``)."""

    def __init__(self, num_blocks, dim, num_heads, ffn_expansion_factor, bias, LayerNorm_type, mode):  # noqa: N803
        super().__init__()
        self.blocks = nn.ModuleList([
            EnhancedTransformerBlock(dim, num_heads, ffn_expansion_factor, bias, LayerNorm_type, mode)
            for _ in range(num_blocks)
        ])

    def forward(self, x, guide):
        """(B, C, H, W) x and Y -> (B, C, H, W)."""
        for block in self.blocks:
            x = block(x, guide)
        return x


class _Resample(nn.Module):
    """3×3 conv + PixelUnshuffle(2) (down, C -> 2C) or PixelShuffle(2) (up, C -> C/2), in ``body``."""

    def __init__(self, channels, down, bias):
        super().__init__()
        out = channels // 2 if down else channels * 2
        shuffle = nn.PixelUnshuffle(2) if down else nn.PixelShuffle(2)
        self.body = nn.Sequential(nn.Conv2d(channels, out, 3, padding=1, bias=bias), shuffle)

    def forward(self, x):
        return self.body(x)


def _tb_stage(n, dim, heads, factor, bias, ln):
    return nn.Sequential(*[TransformerBlock(dim, heads, factor, bias, ln) for _ in range(n)])


@ARCH_REGISTRY.register()
class PerceiveIRNet(FrozenSGMMixin, nn.Module):
    """Perceive-IR restoration network (4-level U-shape, TB encoder, ETB latent/decoder).

    At each decoder level l (and the latent), a Prompt Guidance Module turns
    ``[DINOv2 CLS of layer sgm_layers[l] ‖ Z]`` into a FiLM of the features entering the
    level (Y_l); every ETB of the level cross-attends from Y_l to its running features.
    Z comes from the CFE on the degraded input, the DINOv2 CLS tokens from the frozen SGM
    on the degraded input resized to 224×224.

    The frozen DINOv2 is held outside the registered modules: it is not in
    ``parameters()``/``state_dict()``, not seen by DDP, and moves with ``.to()``.

    Args:
        inp_channels (int): Input channels. Default: 3.
        out_channels (int): Output channels. Default: 3.
        dim (int): Width of level 1. Default: 48.
        num_blocks (Sequence[int]): Blocks of encoder levels 1-3 and the latent; decoder
            levels 3, 2, 1 use num_blocks[2], [1], [0]. Default: (4, 6, 6, 8).
        num_refinement_blocks (int): TBs after decoder level 1. Default: 4.
        heads (Sequence[int]): Attention heads per level. Default: (1, 2, 4, 8).
        ffn_expansion_factor (float): GDFN width factor. Default: 2.66.
        bias (bool): Conv biases (release: on). Default: True.
        LayerNorm_type (str): ``'WithBias'`` (release) or ``'BiasFree'``.
        global_residual (bool): Add the input to the output. Default: True.
        sgm_config (str | dict): DINOv2 configuration (``dinov2_vitb14`` = facebook/dinov2-base;
            ``tiny`` for tests). Default: ``'dinov2_vitb14'``.
        sgm_weights (str, optional): Local DINOv2 weights (HF folder/safetensors or
            ``dinov2_vitb14_pretrain.pth``). Required unless ``sgm_allow_random``.
        sgm_layers (Sequence[int]): DINOv2 layers (1-based) for decoder levels 1, 2, 3 and
            the latent. Default: (1, 4, 8, 12).
        sgm_allow_random (bool): Tests/demos: random DINOv2 when no weights are given.
        cfe_dim (int): Length of Z. Default: 128.
        cfe_channels (Sequence[int]): Widths of the CFE convs. Default: (32, 64, 96, 128).
        cfe_mode (str): ``'release'`` or ``'figure'`` (SPEC §11.4).
        pgm_mode (str): ``'release'`` (X·(1+γ)+β) or ``'figure'`` (X⊙γ+β) (SPEC §11.3).
        etb_mode (str): ``'release'`` (PGCA → MDTA, residual Y) or ``'figure'`` (PGCA + Y → GDFN)
            (SPEC §11.2).
    """
    size_multiple = 8

    def __init__(self, inp_channels=3, out_channels=3, dim=48, num_blocks=(4, 6, 6, 8), num_refinement_blocks=4,
                 heads=(1, 2, 4, 8), ffn_expansion_factor=2.66, bias=True, LayerNorm_type='WithBias',
                 global_residual=True, sgm_config='dinov2_vitb14', sgm_weights=None, sgm_layers=(1, 4, 8, 12),
                 sgm_allow_random=False, cfe_dim=128, cfe_channels=(32, 64, 96, 128), cfe_mode='release',
                 pgm_mode='release', etb_mode='release'):
        super().__init__()
        if len(num_blocks) != 4 or len(heads) != 4 or len(sgm_layers) != 4:
            raise ValueError('PerceiveIRNet: num_blocks, heads and sgm_layers need 4 entries each '
                             f'(got {list(num_blocks)}, {list(heads)}, {list(sgm_layers)}).')
        if inp_channels != 3:
            raise ValueError('PerceiveIRNet: inp_channels must be 3 (DINOv2 and the CFE read RGB images).')
        self.global_residual = global_residual
        encoder = shared_semantic_encoder(sgm_config, sgm_weights, sgm_layers, sgm_allow_random, 'sgm_weights')
        self.sgm = FrozenHolder(encoder)
        widths = [dim, dim * 2, dim * 4, dim * 8]
        ln, f = LayerNorm_type, ffn_expansion_factor

        self.embed = nn.Conv2d(inp_channels, dim, 3, padding=1, bias=bias)
        self.encoder1 = _tb_stage(num_blocks[0], widths[0], heads[0], f, bias, ln)
        self.down1 = _Resample(widths[0], True, bias)
        self.encoder2 = _tb_stage(num_blocks[1], widths[1], heads[1], f, bias, ln)
        self.down2 = _Resample(widths[1], True, bias)
        self.encoder3 = _tb_stage(num_blocks[2], widths[2], heads[2], f, bias, ln)
        self.down3 = _Resample(widths[2], True, bias)

        self.cfe = CompactFeatureExtractor(inp_channels, cfe_channels, cfe_dim, cfe_mode)
        guide_dim = encoder.embed_dim + cfe_dim
        self.pgm = nn.ModuleList([PromptGuidance(w, guide_dim, pgm_mode) for w in widths])

        self.latent = GuidedStage(num_blocks[3], widths[3], heads[3], f, bias, ln, etb_mode)
        self.up3 = _Resample(widths[3], False, bias)
        self.reduce3 = nn.Conv2d(widths[2] * 2, widths[2], 1, bias=bias)
        self.decoder3 = GuidedStage(num_blocks[2], widths[2], heads[2], f, bias, ln, etb_mode)
        self.up2 = _Resample(widths[2], False, bias)
        self.reduce2 = nn.Conv2d(widths[1] * 2, widths[1], 1, bias=bias)
        self.decoder2 = GuidedStage(num_blocks[1], widths[1], heads[1], f, bias, ln, etb_mode)
        self.up1 = _Resample(widths[1], False, bias)
        self.reduce1 = nn.Conv2d(widths[0] * 2, widths[0], 1, bias=bias)
        self.decoder1 = GuidedStage(num_blocks[0], widths[0], heads[0], f, bias, ln, etb_mode)
        self.refinement = _tb_stage(num_refinement_blocks, widths[0], heads[0], f, bias, ln)
        self.output = nn.Conv2d(dim, out_channels, 3, padding=1, bias=bias)

    def guidance(self, x):
        """Guidance vectors [DINO CLS ‖ Z] for decoder levels 1, 2, 3 and the latent.

        Args:
            x (Tensor): (B, 3, H, W) degraded input, RGB, [0, 1].

        Returns:
            tuple[list[Tensor], Tensor]: Four (B, D + cfe_dim) vectors and Z (B, cfe_dim).
        """
        z = self.cfe(x)
        semantic = self.sgm(x)
        return [torch.cat([s.to(z.dtype), z], dim=1) for s in semantic], z

    def forward(self, x, x_pos=None, return_aux=False):
        """Restore a degraded image.

        Args:
            x (Tensor): (B, 3, H, W) degraded image, RGB, [0, 1]; H, W multiples of 8.
            x_pos (Tensor, optional): (B, 3, H', W') a second crop of the same degraded
                images; its Z is returned as the contrastive positive.
            return_aux (bool): Also return ``{'z': (B, cfe_dim), 'z_pos': (B, cfe_dim) or None}``.

        Returns:
            Tensor | tuple[Tensor, dict]: (B, 3, H, W) restored image (not clamped).
        """
        check_size_multiple(x, self.size_multiple, 'PerceiveIRNet')
        guides, z = self.guidance(x)
        e1 = self.encoder1(self.embed(x))
        e2 = self.encoder2(self.down1(e1))
        e3 = self.encoder3(self.down2(e2))
        lat = self.down3(e3)
        lat = self.latent(lat, self.pgm[3](lat, guides[3]))
        d3 = self.reduce3(torch.cat([self.up3(lat), e3], dim=1))
        d3 = self.decoder3(d3, self.pgm[2](d3, guides[2]))
        d2 = self.reduce2(torch.cat([self.up2(d3), e2], dim=1))
        d2 = self.decoder2(d2, self.pgm[1](d2, guides[1]))
        d1 = self.reduce1(torch.cat([self.up1(d2), e1], dim=1))
        d1 = self.decoder1(d1, self.pgm[0](d1, guides[0]))
        out = self.output(self.refinement(d1))
        if self.global_residual:
            out = out + x
        if not return_aux:
            return out
        z_pos = self.cfe(x_pos) if x_pos is not None else None
        return out, {'z': z, 'z_pos': z_pos}


def count_trainable_parameters(net):
    """Number of parameters of ``net`` that require gradients."""
    return sum(p.numel() for p in net.parameters() if p.requires_grad)


__all__ = ['PerceiveIRNet', 'EnhancedTransformerBlock', 'TransformerBlock', 'PGCA', 'MDTA', 'GDFN',
           'count_trainable_parameters']
