"""PSNR loss (NAFNet's training loss)."""
import math

import torch
from torch import nn

from basicsr.utils.registry import LOSS_REGISTRY

# ITU-R BT.601 luma on [0, 1] RGB, giving Y in [16, 235] / 255 (as BasicSR's rgb2ycbcr).
_Y_COEF = (65.481, 128.553, 24.966)


@LOSS_REGISTRY.register()
class PSNRLoss(nn.Module):
    """Negative PSNR: ``loss_weight * 10 / ln(10) * log(MSE + 1e-8)`` per image, reduced.

    Minimising it maximises PSNR; values are usually negative (e.g. -30 for 30 dB).

    Args:
        loss_weight (float): Weight of the loss. Default: 1.0.
        reduction (str): ``'mean'`` (default, NAFNet's), ``'sum'`` or ``'none'`` over the
            batch.
        toY (bool): Compare the luma channel only (inputs must be RGB). Default: False.
    """

    def __init__(self, loss_weight=1.0, reduction='mean', toY=False):  # noqa: N803 (NAFNet's option name)
        super().__init__()
        if reduction not in ('mean', 'sum', 'none'):
            raise ValueError(f"PSNRLoss: unsupported reduction '{reduction}'; use 'mean', 'sum' or 'none'.")
        self.loss_weight = loss_weight
        self.reduction = reduction
        self.toY = toY
        self.scale = 10 / math.log(10)

    @staticmethod
    def _to_y(img):
        if img.shape[1] != 3:
            raise ValueError(f'PSNRLoss(toY=True) needs RGB inputs, got {img.shape[1]} channels.')
        coef = img.new_tensor(_Y_COEF).view(1, 3, 1, 1)
        return ((img * coef).sum(dim=1, keepdim=True) + 16.0) / 255.0

    def forward(self, pred, target, weight=None):
        """Compute the loss.

        Args:
            pred (Tensor): (B, C, H, W) prediction, [0, 1].
            target (Tensor): (B, C, H, W) ground truth, [0, 1].
            weight (Tensor, optional): Element-wise weights broadcastable to the
                compared tensors; the MSE becomes a weighted mean.

        Returns:
            Tensor: Scalar (``mean``/``sum``) or (B,) (``none``).
        """
        if self.toY:
            pred, target = self._to_y(pred), self._to_y(target)
        sq = (pred - target) ** 2
        if weight is None:
            mse = sq.mean(dim=(1, 2, 3))
        else:
            weight = weight.expand_as(sq)
            mse = (sq * weight).sum(dim=(1, 2, 3)) / weight.sum(dim=(1, 2, 3)).clamp_min(1e-12)
        loss = self.scale * torch.log(mse + 1e-8)
        if self.reduction == 'mean':
            loss = loss.mean()
        elif self.reduction == 'sum':
            loss = loss.sum()
        return self.loss_weight * loss
