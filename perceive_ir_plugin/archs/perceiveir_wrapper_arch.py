"""PerceiveIRWrapper: Perceive-IR's semantic + degradation guidance retrofitted onto any registered backbone.

The backbone (Restormer, PromptIR, NAFNet, NAFNetLocal) is built from ``ARCH_REGISTRY``
unchanged. Forward pre-hooks on its decoder-level modules (and its latent) apply a
Prompt Guidance Module (FiLM from ``[DINOv2 CLS ‖ Z]``) to the features entering each of
them. The FiLM layers start at the identity, so with a retrofitted official checkpoint the
wrapper returns exactly the backbone's output until training moves them.
"""
import copy

import torch
from torch import nn

from basicsr.utils import get_root_logger
from basicsr.utils.registry import ARCH_REGISTRY
from perceive_ir_plugin.archs.compact_feature import CompactFeatureExtractor
from perceive_ir_plugin.archs.semantic_guidance import (FrozenHolder, FrozenSGMMixin, PromptGuidance,
                                                         shared_semantic_encoder)
from perceive_ir_plugin.utils.checkpoint import load_checkpoint_into

_FILM_ATTR = '_perceive_ir_film'


def _restormer_levels(net):
    dim = net.patch_embed.proj.out_channels
    # Level 1 decodes at 2·dim (no channel reduction) in Restormer and PromptIR.
    return [('decoder_level1', dim * 2), ('decoder_level2', dim * 2), ('decoder_level3', dim * 4), ('latent', dim * 8)]


def _nafnet_levels(net):
    width = net.intro.out_channels
    n = min(len(net.encoders), len(net.decoders))
    levels = [(f'decoders.{n - 1 - i}', width * 2**i) for i in range(n)]
    return levels + [('middle_blks', width * 2**len(net.encoders))]


# Backbone type -> (function giving [(module name, channels)] from finest decoder level to the
# latent, default DINOv2 layers for the standard depth).
BACKBONE_LEVELS = {
    'Restormer': (_restormer_levels, (1, 4, 8, 12)),
    'PromptIR': (_restormer_levels, (1, 4, 8, 12)),
    'NAFNet': (_nafnet_levels, (1, 4, 6, 8, 12)),
    'NAFNetLocal': (_nafnet_levels, (1, 4, 6, 8, 12)),
}


def _film_pre_hook(module, args):
    film = module.__dict__.pop(_FILM_ATTR, None)
    if film is None:  # backbone called on its own: untouched
        return None
    pgm, guide = film
    return (pgm(args[0], guide), ) + tuple(args[1:])


@ARCH_REGISTRY.register()
class PerceiveIRWrapper(FrozenSGMMixin, nn.Module):
    """Any registered backbone + SGM (frozen DINOv2) + CFE + per-level FiLM (PGM).

    Args:
        backbone (dict): Options of the backbone, ``{type: Restormer|PromptIR|NAFNet|NAFNetLocal, ...}``
            (constructor arguments as in their own option files).
        levels (list, optional): ``[[module name, channels], ...]`` from the finest decoder
            level to the latent, to guide other modules or other backbones. Default: the
            table :data:`BACKBONE_LEVELS` (Restormer/PromptIR: ``decoder_level1..3`` and
            ``latent``; NAFNet: ``decoders.*`` and ``middle_blks``).
        sgm_config (str | dict): DINOv2 configuration. Default: ``'dinov2_vitb14'``.
        sgm_weights (str, optional): Local DINOv2 weights; required unless ``sgm_allow_random``.
        sgm_layers (Sequence[int], optional): DINOv2 layer per guided level, same order as
            ``levels``. Default: (1, 4, 8, 12) for 4 levels, (1, 4, 6, 8, 12) for NAFNet's 5.
        sgm_allow_random (bool): Tests/demos: random DINOv2 when no weights are given.
        cfe_dim (int): Length of Z. Default: 128.
        cfe_channels (Sequence[int]): CFE widths. Default: (32, 64, 96, 128).
        cfe_mode (str): ``'release'`` or ``'figure'``.
        zero_init (bool): Start every FiLM at the identity (exact backbone output at step 0).
            Default: True.
    """

    def __init__(self, backbone=None, levels=None, sgm_config='dinov2_vitb14', sgm_weights=None, sgm_layers=None,
                 sgm_allow_random=False, cfe_dim=128, cfe_channels=(32, 64, 96, 128), cfe_mode='release',
                 zero_init=True):
        super().__init__()
        if not isinstance(backbone, dict) or 'type' not in backbone:
            raise ValueError("PerceiveIRWrapper: option 'backbone' must be a dict with a 'type' (Restormer, "
                             f'PromptIR, NAFNet, NAFNetLocal), got {backbone!r}.')
        opt = copy.deepcopy(backbone)
        self.backbone_type = opt.pop('type')
        self.backbone = ARCH_REGISTRY.get(self.backbone_type)(**opt)
        if levels is None:
            if self.backbone_type not in BACKBONE_LEVELS:
                raise ValueError(f"PerceiveIRWrapper: no level table for backbone '{self.backbone_type}'; give "
                                 "'levels' as [[module name, channels], ...] (finest decoder level first).")
            level_fn, default_layers = BACKBONE_LEVELS[self.backbone_type]
            levels = level_fn(self.backbone)
        else:
            default_layers = None
        self.levels = [(str(name), int(ch)) for name, ch in levels]
        modules = dict(self.backbone.named_modules())
        for name, _ in self.levels:
            if name not in modules:
                raise ValueError(f"PerceiveIRWrapper: backbone {self.backbone_type} has no module '{name}' "
                                 '(option levels).')
        if sgm_layers is None:
            if default_layers is None or len(default_layers) != len(self.levels):
                raise ValueError(f'PerceiveIRWrapper: give sgm_layers ({len(self.levels)} DINOv2 layers, one per '
                                 'guided level).')
            sgm_layers = default_layers
        if len(sgm_layers) != len(self.levels):
            raise ValueError(f'PerceiveIRWrapper: sgm_layers has {len(sgm_layers)} entries for '
                             f'{len(self.levels)} guided levels {[n for n, _ in self.levels]}.')
        encoder = shared_semantic_encoder(sgm_config, sgm_weights, sgm_layers, sgm_allow_random, 'sgm_weights')
        self.sgm = FrozenHolder(encoder)
        self.cfe = CompactFeatureExtractor(3, cfe_channels, cfe_dim, cfe_mode)
        guide_dim = encoder.embed_dim + cfe_dim
        self.pgm = nn.ModuleList([PromptGuidance(ch, guide_dim, 'release', zero_init) for _, ch in self.levels])
        for name, _ in self.levels:
            modules[name].register_forward_pre_hook(_film_pre_hook)

    @property
    def size_multiple(self):
        """Input size multiple required by the backbone."""
        return getattr(self.backbone, 'size_multiple', 1)

    def load_backbone(self, path, param_key=None, strict=True, trust=False,
                      option_key='path.pretrain_network_backbone'):
        """Load an official/BasicSR/Lightning checkpoint into the inner backbone.

        Args:
            path (str): Checkpoint (e.g. Restormer ``deraining.pth``, PromptIR ``model.ckpt``).
            param_key (str, optional): Top-level key; detected when None.
            strict (bool): Fail on any key/shape difference.
            trust (bool): Allow unpickling non-tensor extras (see utils/checkpoint.py).
            option_key (str): Option quoted in errors.

        Returns:
            dict: The mismatch report of :func:`load_checkpoint_into`.
        """
        report = load_checkpoint_into(self.backbone, path, param_key=param_key, strict=strict, trust=trust,
                                      option_key=option_key)
        get_root_logger().info(f'PerceiveIRWrapper: loaded {self.backbone_type} weights from {path}.')
        return report

    def forward(self, x, x_pos=None, return_aux=False):
        """Restore a degraded image with guidance.

        Args:
            x (Tensor): (B, 3, H, W) degraded image, RGB, [0, 1] (size rules of the backbone).
            x_pos (Tensor, optional): (B, 3, H', W') second crops; their Z is returned.
            return_aux (bool): Also return ``{'z': (B, cfe_dim), 'z_pos': (B, cfe_dim) or None}``.

        Returns:
            Tensor | tuple[Tensor, dict]: (B, 3, H, W) restored image.
        """
        z = self.cfe(x)
        semantic = self.sgm(x)
        modules = dict(self.backbone.named_modules())
        try:
            for (name, _), pgm, feat in zip(self.levels, self.pgm, semantic):
                modules[name].__dict__[_FILM_ATTR] = (pgm, torch.cat([feat.to(z.dtype), z], dim=1))
            out = self.backbone(x)
        finally:
            for name, _ in self.levels:
                modules[name].__dict__.pop(_FILM_ATTR, None)
        if not return_aux:
            return out
        z_pos = self.cfe(x_pos) if x_pos is not None else None
        return out, {'z': z, 'z_pos': z_pos}
