"""Difficulty-adaptive perceptual loss (L_dpl, SPEC §4.2) and its frozen VGG-16 feature extractor."""
import torch
from torch import nn

from basicsr.utils import get_root_logger
from basicsr.utils.registry import LOSS_REGISTRY
from perceive_ir_plugin.utils.checkpoint import CheckpointError, load_state_dict_for

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# torchvision vgg16 "D" configuration up to conv3_3 (= features[:16]).
_VGG16_PREFIX_CFG = (64, 64, 'M', 128, 128, 'M', 256, 256, 256)
# Module indices of features[:16] whose outputs are tapped: relu1_2, relu2_2, relu3_1, relu3_3.
# The release taps indices 3, 7, 11, 15 of torchvision's in-place-ReLU model, so the tap at 7
# (conv2_2) holds the ReLU'd values of index 8: the effective features are these four ReLUs.
VGG_TAPS = {3: 'relu1_2', 8: 'relu2_2', 11: 'relu3_1', 15: 'relu3_3'}


class VGG16Features(nn.Module):
    """Frozen torchvision VGG-16 ``features[:16]`` returning relu1_2/relu2_2/relu3_1/relu3_3.

    The layers are laid out exactly like torchvision's ``vgg16().features`` (same module
    indices, so a torchvision state dict ``features.N.*`` loads directly), with non-in-place
    ReLUs so each tap holds what its name says.

    Args:
        weights (str, optional): Local torchvision VGG-16 file (``vgg16-397923af.pth``);
            only ``features.0..14`` are read, the classifier is ignored.
        allow_random (bool): Without ``weights``, keep the random initialisation (tests and
            demos only; logged as a warning). Default: False.
        option_key (str): Option name quoted in errors. Default: ``'vgg_weights'``.
    """

    def __init__(self, weights=None, allow_random=False, option_key='vgg_weights'):
        super().__init__()
        layers, in_ch = [], 3
        for v in _VGG16_PREFIX_CFG:
            if v == 'M':
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                layers += [nn.Conv2d(in_ch, v, kernel_size=3, padding=1), nn.ReLU(inplace=False)]
                in_ch = v
        self.features = nn.Sequential(*layers)
        self.register_buffer('mean', torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer('std', torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        if weights is not None:
            self._load(weights, option_key)
        elif allow_random:
            get_root_logger().warning(
                f'VGG16Features: no {option_key} given and random weights allowed: the perceptual loss '
                'uses a RANDOMLY INITIALISED VGG-16. Only acceptable in tests and demos; set '
                f'{option_key} to the torchvision file vgg16-397923af.pth for real training.')
        else:
            raise ValueError(f"Option '{option_key}' is required: the local torchvision VGG-16 weight file "
                             '(vgg16-397923af.pth). Random weights are only used when explicitly allowed.')
        self.requires_grad_(False)
        self.eval()

    def _load(self, path, option_key):
        state_dict, report = load_state_dict_for(self, path, option_key=option_key)
        if report['missing'] or report['shape']:
            problems = report['missing'][:5] + [k for k, _, _ in report['shape'][:5]]
            raise CheckpointError(f"'{path}' (option '{option_key}') is not a torchvision VGG-16 state dict: "
                                  f'missing or mis-shaped keys {problems}.')
        own = self.state_dict()
        self.load_state_dict({k: state_dict[k] for k in own}, strict=True)

    def train(self, mode=True):
        """Always stays in eval mode (frozen)."""
        return super().train(False)

    def forward(self, x):
        """Compute the tapped features.

        Args:
            x (Tensor): (B, 3, H, W) RGB in [0, 1] (clamped here).

        Returns:
            list[Tensor]: relu1_2 (B,64,H,W), relu2_2 (B,128,H/2,W/2), relu3_1 and relu3_3
            (B,256,H/4,W/4).
        """
        x = (x.clamp(0, 1) - self.mean) / self.std
        feats = []
        for idx, layer in enumerate(self.features):
            x = layer(x)
            if idx in VGG_TAPS:
                feats.append(x)
        return feats


@LOSS_REGISTRY.register()
class DifficultyAdaptivePerceptualLoss(nn.Module):
    """Contrastive perceptual loss with difficulty-weighted proxy negatives (L_dpl).

    Per sample, with d(a, b) the mean absolute difference over C, H, W of VGG features:

        L = Σ_l w_l · d(R, GT) / max(lq_weight · d(R, LQ) + Σ_k m_k α_k d(R, P_k), eps)

    averaged over the batch. GT, LQ and proxy features are computed without gradient.

    Args:
        loss_weight (float): Multiplier of the loss. Default: 1.0.
        vgg_weights (str, optional): Local torchvision VGG-16 file. Required unless
            ``allow_random_vgg``.
        allow_random_vgg (bool): Tests/demos only: random VGG when no file is given.
        layer_weights (list[float]): w_l for relu1_2, relu2_2, relu3_1, relu3_3.
            Default: (1/12, 1/6, 1/3, 1).
        lq_weight (float): Coefficient of the degraded-input negative. Default: 2.
        hard_alpha (float): α of a proxy whose PSNR is <= the probe PSNR. Default: 1.25.
        easy_alpha (float): α otherwise. Default: 0.75.
        eps (float): Lower clamp of the denominator. Default: 1e-6.
    """

    def __init__(self, loss_weight=1.0, vgg_weights=None, allow_random_vgg=False,
                 layer_weights=(1 / 12, 1 / 6, 1 / 3, 1.0), lq_weight=2.0, hard_alpha=1.25, easy_alpha=0.75,
                 eps=1e-6):
        super().__init__()
        if len(layer_weights) != len(VGG_TAPS):
            raise ValueError(f'DifficultyAdaptivePerceptualLoss: layer_weights needs {len(VGG_TAPS)} values '
                             f'(relu1_2, relu2_2, relu3_1, relu3_3), got {list(layer_weights)}.')
        self.loss_weight = loss_weight
        self.layer_weights = [float(w) for w in layer_weights]
        self.lq_weight = lq_weight
        self.hard_alpha = hard_alpha
        self.easy_alpha = easy_alpha
        self.eps = eps
        self.vgg = VGG16Features(vgg_weights, allow_random=allow_random_vgg, option_key='vgg_weights')

    def train(self, mode=True):
        """The loss holds only frozen parts: stays in eval mode."""
        return super().train(False)

    def difficulty_alpha(self, proxy_psnr, reference_psnr):
        """α_k per sample and proxy.

        Args:
            proxy_psnr (Tensor): (B, K) PSNR of each proxy output against GT (dB).
            reference_psnr (float): The model's current probe PSNR (dB).

        Returns:
            Tensor: (B, K) with ``hard_alpha`` where PSNR <= reference, else ``easy_alpha``.
        """
        hard = torch.full_like(proxy_psnr, self.hard_alpha)
        return torch.where(proxy_psnr <= reference_psnr, hard, torch.full_like(proxy_psnr, self.easy_alpha))

    @staticmethod
    def _distance(a, b):
        return (a - b).abs().flatten(1).mean(dim=1)

    def forward(self, output, gt, lq, proxies=None, proxy_mask=None, proxy_alpha=None):
        """Compute the loss.

        Args:
            output (Tensor): (B, 3, H, W) restored image R, RGB, [0, 1].
            gt (Tensor): (B, 3, H, W) ground truth.
            lq (Tensor): (B, 3, H, W) degraded input.
            proxies (Tensor | list[Tensor], optional): (B, K, 3, H, W) or K tensors
                (B, 3, H, W): proxy restorations P_k (entries where the mask is 0 are ignored).
            proxy_mask (Tensor, optional): (B, K) m_k in {0, 1}. Default: all ones.
            proxy_alpha (Tensor, optional): (B, K) α_k. Default: all ones.

        Returns:
            Tensor: Scalar loss times ``loss_weight``.
        """
        if isinstance(proxies, (list, tuple)):
            proxies = torch.stack(list(proxies), dim=1) if len(proxies) else None
        n_proxy = 0 if proxies is None else proxies.shape[1]
        batch = output.shape[0]
        if n_proxy:
            if proxies.shape[0] != batch or proxies.shape[2:] != output.shape[1:]:
                raise ValueError(f'DifficultyAdaptivePerceptualLoss: proxies {tuple(proxies.shape)} do not fit '
                                 f'output {tuple(output.shape)}; expected (B, K, 3, H, W).')
            ones = output.new_ones(batch, n_proxy, dtype=torch.float32)
            proxy_mask = ones if proxy_mask is None else proxy_mask.to(ones)
            proxy_alpha = ones if proxy_alpha is None else proxy_alpha.to(ones)
            for name, value in (('proxy_mask', proxy_mask), ('proxy_alpha', proxy_alpha)):
                if tuple(value.shape) != (batch, n_proxy):
                    raise ValueError(f'DifficultyAdaptivePerceptualLoss: {name} has shape {tuple(value.shape)}, '
                                     f'expected {(batch, n_proxy)}.')
        feats_r = self.vgg(output)
        with torch.no_grad():
            refs = [gt, lq] + ([proxies[:, k] for k in range(n_proxy)] if n_proxy else [])
            feats_ref = self.vgg(torch.cat([r.to(output.dtype) for r in refs], dim=0))
        with torch.autocast(device_type=output.device.type, enabled=False):
            total = output.new_zeros(batch, dtype=torch.float32)
            for weight, f_r, f_all in zip(self.layer_weights, feats_r, feats_ref):
                f_r = f_r.float()
                chunks = f_all.float().split(batch, dim=0)
                positive = self._distance(f_r, chunks[0])
                negative = self.lq_weight * self._distance(f_r, chunks[1])
                for k in range(n_proxy):
                    term = proxy_alpha[:, k] * self._distance(f_r, chunks[2 + k])
                    negative = negative + torch.where(proxy_mask[:, k] > 0, proxy_mask[:, k] * term, 0.0)
                total = total + weight * positive / negative.clamp(min=self.eps)
            loss = total.mean()
        return loss * self.loss_weight
