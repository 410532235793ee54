"""CLIP-aware quality loss (L_clip, SPEC §3): the frozen stage-1 quality perceiver scores the restored image."""
import copy

from torch import nn

from basicsr.utils import get_root_logger
from basicsr.utils.registry import ARCH_REGISTRY, LOSS_REGISTRY


@LOSS_REGISTRY.register()
class QualityCLIPLoss(nn.Module):
    """``mean(1 - p_excellent)`` of the frozen quality perceiver on the restored image.

    The perceiver (stage 1: frozen CLIP + frozen learned prompts) is built from the
    registry, frozen (no parameter requires grad, eval mode, text features cached) and
    kept out of the restoration network, so it is never saved in ``params`` nor wrapped
    by DDP. Gradients flow through its frozen image encoder into the restored image.

    Args:
        loss_weight (float): Multiplier of the loss. Default: 1.0.
        perceiver (dict | nn.Module): Options of the perceiver network, e.g.
            ``{type: QualityPerceiver, clip_model: ViT-B-32-quickgelu, clip_weights: <file>,
            prompt_weights: <file>}``, or an already built module with a
            ``probabilities(img, logit_scale=...)`` method.
        logit_scale (None | float | str): Scale of the cosines before the 3-way softmax.
            ``None`` (release default): raw cosines, near-uniform probabilities and
            L ≈ 2/3 (SPEC §11.6); a float: that factor (100 = CLIP's stage-1 scale);
            ``'clip'``: CLIP's own learned scale.
        target_class (str): Class whose probability is pushed to 1. Default: ``'excellent'``.
        clamp (bool): Clamp the restored image to [0, 1] first (release). Default: True.
    """

    def __init__(self, loss_weight=1.0, perceiver=None, logit_scale=None, target_class='excellent', clamp=True):
        super().__init__()
        if perceiver is None:
            raise ValueError("QualityCLIPLoss: option 'perceiver' is required (e.g. {type: QualityPerceiver, "
                             'clip_weights: ..., prompt_weights: ...}).')
        if isinstance(perceiver, dict):
            opt = copy.deepcopy(perceiver)
            arch = opt.pop('type', 'QualityPerceiver')
            perceiver = ARCH_REGISTRY.get(arch)(**opt)
        if not hasattr(perceiver, 'probabilities'):
            raise TypeError(f'QualityCLIPLoss: perceiver {type(perceiver).__name__} has no probabilities() method.')
        if isinstance(logit_scale, str) and logit_scale != 'clip':
            raise ValueError(f"QualityCLIPLoss: logit_scale must be null, a number or 'clip', got '{logit_scale}'.")
        class_names = list(getattr(perceiver, 'class_names', ('terrible', 'mediocre', 'excellent')))
        if target_class not in class_names:
            raise ValueError(f"QualityCLIPLoss: target_class '{target_class}' is not one of the perceiver's "
                             f'classes {class_names}.')
        self.target_index = class_names.index(target_class)
        self.loss_weight = loss_weight
        self.logit_scale = logit_scale
        self.clamp = clamp
        perceiver.requires_grad_(False)
        perceiver.eval()
        if hasattr(perceiver, 'freeze'):
            perceiver.freeze()
        self.perceiver = perceiver
        if logit_scale is None:
            get_root_logger().info('QualityCLIPLoss: softmax over raw cosines (release behaviour, no logit scale); '
                                   'probabilities are near uniform, see SPEC §11.6.')

    def train(self, mode=True):
        """The perceiver is frozen: the loss stays in eval mode."""
        return super().train(False)

    def forward(self, output):
        """Compute the loss.

        Args:
            output (Tensor): (B, 3, H, W) restored image, RGB, [0, 1].

        Returns:
            Tensor: Scalar ``loss_weight * mean(1 - p_target)``.
        """
        img = output.clamp(0, 1) if self.clamp else output
        prob = self.perceiver.probabilities(img, logit_scale=self.logit_scale)
        return (1.0 - prob[:, self.target_index].float()).mean() * self.loss_weight
