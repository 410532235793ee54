"""Semantic Guidance Module (SGM, SPEC §5): frozen DINOv2 CLS tokens + Prompt Guidance (FiLM) modules.

The DINOv2 encoder is timm's ``VisionTransformer`` with the DINOv2 ViT configuration. Its
weights come from a local file in any of these layouts (converted on load):

* Hugging Face ``facebook/dinov2-base``: a folder with ``model.safetensors`` or
  ``pytorch_model.bin``, or one of those files (keys ``embeddings.*``, ``encoder.layer.N.*``,
  ``layernorm.*``; an optional ``dinov2.`` prefix is stripped);
* the original ``dinov2_vitb14_pretrain.pth`` (keys ``cls_token``, ``pos_embed``,
  ``blocks.N.*`` or chunked ``blocks.C.N.*``, ``mask_token``), which is also timm's layout.

The position embedding is resampled once, at load time, to the encoder's fixed input grid
(224 / 14 = 16 × 16) with timm's bicubic, anti-aliased resampling (the same as current
``transformers``' DINOv2 interpolation).

The encoder is frozen and never part of a restoration network's ``state_dict`` or of
its DDP-visible parameters: networks hold it through :class:`FrozenHolder`.
"""
import os
import re
import weakref

import torch
from torch import nn
from torch.nn import functional as F

from basicsr.utils import get_root_logger
from perceive_ir_plugin.utils.checkpoint import CheckpointError, load_checkpoint_file

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# ViT configurations of DINOv2 (timm VisionTransformer arguments). ``tiny`` is a random,
# fast configuration for tests that runs through exactly the same code.
DINOV2_CONFIGS = {
    'dinov2_vits14': dict(img_size=224, patch_size=14, embed_dim=384, depth=12, num_heads=6),
    'dinov2_vitb14': dict(img_size=224, patch_size=14, embed_dim=768, depth=12, num_heads=12),
    'dinov2_vitl14': dict(img_size=224, patch_size=14, embed_dim=1024, depth=24, num_heads=16),
    'tiny': dict(img_size=28, patch_size=14, embed_dim=16, depth=12, num_heads=2),
}
HF_WEIGHT_FILES = ('model.safetensors', 'pytorch_model.bin')


# ----------------------------------------------------------------------------------------------
# Weight layouts
# ----------------------------------------------------------------------------------------------
def _hf_to_timm(sd):
    out, qkv = {}, {}
    for key, value in sd.items():
        if key.startswith('dinov2.'):
            key = key[len('dinov2.'):]
        if key == 'embeddings.mask_token' or key.startswith('classifier.'):
            continue
        m = re.match(r'encoder\.layer\.(\d+)\.(.+)$', key)
        if m:
            i, rest = m.groups()
            a = re.match(r'attention\.attention\.(query|key|value)\.(weight|bias)$', rest)
            if a:
                qkv.setdefault((i, a.group(2)), {})[a.group(1)] = value
                continue
            rest = (rest.replace('attention.output.dense.', 'attn.proj.').replace('layer_scale1.lambda1', 'ls1.gamma')
                    .replace('layer_scale2.lambda1', 'ls2.gamma'))
            out[f'blocks.{i}.{rest}'] = value
            continue
        mapped = {'embeddings.cls_token': 'cls_token', 'embeddings.position_embeddings': 'pos_embed'}.get(key)
        if mapped is None:
            mapped = (key.replace('embeddings.patch_embeddings.projection.', 'patch_embed.proj.')
                      .replace('layernorm.', 'norm.'))
        out[mapped] = value
    for (i, kind), parts in qkv.items():
        if set(parts) != {'query', 'key', 'value'}:
            raise CheckpointError(f'DINOv2 (Hugging Face layout): layer {i} lacks one of query/key/value {kind}.')
        out[f'blocks.{i}.attn.qkv.{kind}'] = torch.cat([parts['query'], parts['key'], parts['value']], dim=0)
    return out


def _original_to_timm(sd):
    out = {}
    for key, value in sd.items():
        if key == 'mask_token':
            continue
        if re.match(r'blocks\.\d+\.mlp\.w(12|3)\.', key):
            raise CheckpointError('DINOv2 checkpoint uses SwiGLU MLPs (ViT-g); only the ViT-S/B/L configurations '
                                  'are supported.')
        # Chunked FSDP layout blocks.<chunk>.<global index>.* -> blocks.<global index>.*
        key = re.sub(r'^blocks\.\d+\.(\d+)\.', r'blocks.\1.', key)
        out[key] = value
    return out


def dinov2_layout(sd):
    """Name the layout of a DINOv2 state dict: ``'hf'``, ``'original'`` or ``None`` (unknown)."""
    keys = set(sd)
    if any(k.startswith(('embeddings.', 'dinov2.embeddings.')) for k in keys):
        return 'hf'
    if 'cls_token' in keys and any(k.startswith('blocks.') for k in keys):
        return 'original'
    return None


def timm_to_hf_dinov2(sd):
    """Write a timm/original-layout DINOv2 state dict in the Hugging Face layout.

    Used to export weights and by the tests' layout round trips. A ``mask_token`` of zeros
    is added (the HF model has one; it is unused for inference).
    """
    out = {}
    for key, value in sd.items():
        m = re.match(r'blocks\.(\d+)\.(.+)$', key)
        if m:
            i, rest = m.groups()
            base = f'encoder.layer.{i}.'
            a = re.match(r'attn\.qkv\.(weight|bias)$', rest)
            if a:
                for name, part in zip(('query', 'key', 'value'), value.chunk(3, dim=0)):
                    out[f'{base}attention.attention.{name}.{a.group(1)}'] = part.clone()
                continue
            rest = (rest.replace('attn.proj.', 'attention.output.dense.').replace('ls1.gamma', 'layer_scale1.lambda1')
                    .replace('ls2.gamma', 'layer_scale2.lambda1'))
            out[base + rest] = value
            continue
        mapped = {'cls_token': 'embeddings.cls_token', 'pos_embed': 'embeddings.position_embeddings'}.get(key)
        if mapped is None:
            mapped = key.replace('patch_embed.proj.', 'embeddings.patch_embeddings.projection.').replace(
                'norm.', 'layernorm.', 1) if key.startswith(('patch_embed.', 'norm.')) else key
        out[mapped] = value
    out['embeddings.mask_token'] = torch.zeros(1, sd['cls_token'].shape[-1])
    return out


def timm_to_original_dinov2(sd):
    """Write a timm-layout DINOv2 state dict in the original ``dinov2_vit*14`` layout (adds ``mask_token``)."""
    out = dict(sd)
    out['mask_token'] = torch.zeros(1, sd['cls_token'].shape[-1])
    return out


def _read_weight_file(path, option_key):
    if os.path.isdir(path):
        for name in HF_WEIGHT_FILES:
            candidate = os.path.join(path, name)
            if os.path.isfile(candidate):
                path = candidate
                break
        else:
            raise FileNotFoundError(f"Option '{option_key}': folder '{path}' holds none of {HF_WEIGHT_FILES} "
                                    '(expected a Hugging Face facebook/dinov2-* snapshot).')
    if path.endswith('.safetensors'):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"DINOv2 weights not found: '{path}' (option '{option_key}').")
        from safetensors.torch import load_file  # safetensors never runs code
        return load_file(path, device='cpu')
    ckpt = load_checkpoint_file(path, option_key=option_key)
    if isinstance(ckpt, dict) and 'model' in ckpt and isinstance(ckpt['model'], dict):
        ckpt = ckpt['model']
    if isinstance(ckpt, dict) and 'state_dict' in ckpt and isinstance(ckpt['state_dict'], dict):
        ckpt = ckpt['state_dict']
    return ckpt


def load_dinov2_state_dict(path, vit, option_key='sgm_weights'):
    """Read DINOv2 weights in the HF or original layout and fit them to ``vit`` (timm layout).

    Args:
        path (str): File or Hugging Face folder.
        vit (nn.Module): The timm ``VisionTransformer`` they are for (its position grid
            decides the resampling).
        option_key (str): Option quoted in errors.

    Returns:
        dict[str, Tensor]: State dict with exactly ``vit``'s keys and shapes.
    """
    from timm.layers import resample_abs_pos_embed

    raw = _read_weight_file(path, option_key)
    layout = dinov2_layout(raw) if isinstance(raw, dict) else None
    if layout is None:
        raise CheckpointError(f"'{path}' (option '{option_key}') is not a DINOv2 checkpoint: expected the Hugging "
                              "Face layout (embeddings.*, encoder.layer.N.*) or the original dinov2 layout "
                              f"(cls_token, pos_embed, blocks.N.*); found keys {sorted(raw)[:6]}.")
    sd = _hf_to_timm(raw) if layout == 'hf' else _original_to_timm(raw)
    sd = {k: v for k, v in sd.items() if not k.startswith('head.')}
    target = vit.state_dict()
    pos = sd.get('pos_embed')
    if pos is not None and pos.shape != target['pos_embed'].shape:
        grid = vit.patch_embed.grid_size
        sd['pos_embed'] = resample_abs_pos_embed(pos.float(), new_size=list(grid), num_prefix_tokens=1,
                                                 interpolation='bicubic', antialias=True, verbose=False)
    missing = sorted(set(target) - set(sd))
    unexpected = sorted(set(sd) - set(target))
    shapes = [k for k in target if k in sd and sd[k].shape != target[k].shape]
    if missing or unexpected or shapes:
        raise CheckpointError(f"'{path}' (option '{option_key}', {layout} layout) does not fit the configured "
                              f'DINOv2 encoder: missing {missing[:5]}, unexpected {unexpected[:5]}, '
                              f'shape differences {shapes[:5]} (is sgm_config the right model size?).')
    return {k: sd[k].to(target[k].dtype) for k in target}


# ----------------------------------------------------------------------------------------------
# Encoder
# ----------------------------------------------------------------------------------------------
class DINOv2SemanticEncoder(nn.Module):
    """Frozen DINOv2: CLS tokens of chosen transformer layers (pre-final-norm).

    Args:
        config (str | dict): A name of :data:`DINOV2_CONFIGS` (``dinov2_vitb14`` = the
            release's ``facebook/dinov2-base``) or a dict with ``img_size, patch_size,
            embed_dim, depth, num_heads``.
        weights (str, optional): Local weight file or HF folder (see module docstring).
        layers (Sequence[int]): 1-based layer indices whose outputs' CLS tokens are
            returned (``hidden_states[l][:, 0]`` in HF terms). Default: (1, 4, 8, 12).
        allow_random (bool): Without ``weights``, keep random weights (tests and demos
            only; logged as a warning). Default: False.
        option_key (str): Option name quoted in errors. Default: ``'sgm_weights'``.
    """

    def __init__(self, config='dinov2_vitb14', weights=None, layers=(1, 4, 8, 12), allow_random=False,
                 option_key='sgm_weights'):
        super().__init__()
        from timm.models.vision_transformer import VisionTransformer

        if isinstance(config, str):
            if config not in DINOV2_CONFIGS:
                raise ValueError(f"Unknown DINOv2 config '{config}' (option 'sgm_config'); choose from "
                                 f'{sorted(DINOV2_CONFIGS)} or give a dict.')
            config = DINOV2_CONFIGS[config]
        cfg = dict(config)
        self.layers = tuple(int(i) for i in layers)
        if not self.layers or min(self.layers) < 1 or max(self.layers) > cfg['depth']:
            raise ValueError(f'sgm_layers {list(layers)} must be 1-based indices within the encoder depth '
                             f"{cfg['depth']}.")
        self.embed_dim = cfg['embed_dim']
        self.img_size = cfg['img_size']
        self.vit = VisionTransformer(img_size=cfg['img_size'], patch_size=cfg['patch_size'],
                                     embed_dim=cfg['embed_dim'], depth=cfg['depth'], num_heads=cfg['num_heads'],
                                     mlp_ratio=cfg.get('mlp_ratio', 4.0), init_values=cfg.get('init_values', 1e-5),
                                     num_classes=0, global_pool='token')
        self.register_buffer('mean', torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer('std', torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        if weights is not None:
            self.vit.load_state_dict(load_dinov2_state_dict(weights, self.vit, option_key), strict=True)
        elif allow_random:
            get_root_logger().warning(f'DINOv2SemanticEncoder: no {option_key} given and random weights allowed: '
                                      'semantic guidance comes from a RANDOMLY INITIALISED ViT (tests/demos only).')
        else:
            raise ValueError(f"Option '{option_key}' is required: a local DINOv2 weight file or Hugging Face folder "
                             '(facebook/dinov2-base or dinov2_vitb14_pretrain.pth). Nothing is downloaded.')
        self.requires_grad_(False)
        self.eval()

    def train(self, mode=True):
        """Always stays in eval mode (frozen)."""
        return super().train(False)

    @torch.no_grad()
    def forward(self, x):
        """CLS tokens of the configured layers.

        Args:
            x (Tensor): (B, 3, H, W) degraded image, RGB, [0, 1]; resized bicubically to
                ``img_size`` × ``img_size`` (aspect ratio not kept) and ImageNet-normalised.

        Returns:
            list[Tensor]: One (B, embed_dim) tensor per layer of ``layers``, in that order.
        """
        x = F.interpolate(x, size=(self.img_size, self.img_size), mode='bicubic', align_corners=False)
        x = (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        order = sorted(set(self.layers))
        taken = self.vit.forward_intermediates(x, indices=[i - 1 for i in order], return_prefix_tokens=True,
                                               norm=False, stop_early=True, output_fmt='NLC',
                                               intermediates_only=True)
        cls = {layer: prefix[:, 0] for layer, (_, prefix) in zip(order, taken)}
        return [cls[i] for i in self.layers]


_SHARED_ENCODERS = weakref.WeakValueDictionary()


def shared_semantic_encoder(config='dinov2_vitb14', weights=None, layers=(1, 4, 8, 12), allow_random=False,
                            option_key='sgm_weights'):
    """One frozen encoder per (config, weights file, layers) in the process.

    Networks built twice from the same options (``net_g`` and an EMA copy, proxies) share
    the frozen DINOv2 instead of holding two 86 M-parameter copies. Random encoders
    (no weights) are never shared.
    """
    if weights is None:
        return DINOv2SemanticEncoder(config, None, layers, allow_random, option_key)
    key = (repr(config), os.path.abspath(str(weights)), tuple(layers))
    encoder = _SHARED_ENCODERS.get(key)
    if encoder is None:
        encoder = DINOv2SemanticEncoder(config, weights, layers, allow_random, option_key)
        _SHARED_ENCODERS[key] = encoder
    return encoder


class FrozenHolder:
    """Keeps a frozen module out of a network's registered children.

    A module stored in a :class:`FrozenHolder` attribute is invisible to ``parameters()``,
    ``state_dict()``, ``train()`` and DDP (which only sees registered parameters and
    buffers), so it is neither trained, synchronised nor saved in ``params``. The owning
    network forwards device/dtype moves to it by calling :meth:`apply` from its
    ``_apply`` override.
    """

    def __init__(self, module):
        self.module = module

    def apply(self, fn):
        """Apply a tensor function (from ``nn.Module._apply``: ``.to``, ``.cuda``...) to the held module."""
        self.module._apply(fn)

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)



class FrozenSGMMixin:
    """For networks that keep their frozen SGM encoder in ``self.sgm`` (a :class:`FrozenHolder`).

    Exposes the encoder as ``semantic_encoder`` and forwards device/dtype moves to it.
    """

    @property
    def semantic_encoder(self):
        """The frozen DINOv2 encoder (not a registered sub-module)."""
        return self.sgm.module

    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)
        self.sgm.apply(fn)
        return self

# ----------------------------------------------------------------------------------------------
# Prompt Guidance Module (FiLM)
# ----------------------------------------------------------------------------------------------
class PromptGuidance(nn.Module):
    """Prompt Guidance Module: per-channel FiLM of a feature map from a guidance vector.

    ``release`` (default, the authors' code): ``affine = Linear(G→2C) – GELU – Linear(2C→2C)``
    gives γ, β and ``Y = X·(1+γ) + β``. ``figure`` (paper figure): two branches
    ``Linear(G→C) – Conv1×1(C→C)`` for γ and β and ``Y = X⊙γ + β``.

    Args:
        channels (int): C, channels of the modulated feature map.
        guide_dim (int): G, length of the guidance vector ([DINO CLS ‖ Z], 768 + 128).
        mode (str): ``'release'`` or ``'figure'``.
        zero_init (bool): Zero the last layer (release mode) so the module starts as the
            identity (γ = β = 0). Used when retrofitting pre-trained backbones.
    """

    def __init__(self, channels, guide_dim, mode='release', zero_init=False):
        super().__init__()
        if mode not in ('release', 'figure'):
            raise ValueError(f"pgm_mode must be 'release' or 'figure', got '{mode}'.")
        self.mode = mode
        self.channels = channels
        if mode == 'release':
            self.affine = nn.Sequential(nn.Linear(guide_dim, 2 * channels), nn.GELU(),
                                        nn.Linear(2 * channels, 2 * channels))
            if zero_init:
                nn.init.zeros_(self.affine[2].weight)
                nn.init.zeros_(self.affine[2].bias)
        else:
            if zero_init:
                raise ValueError("zero_init needs pgm_mode 'release' (the figure's X⊙γ+β is not the identity at 0).")
            self.gamma = nn.Sequential(nn.Linear(guide_dim, channels), nn.Unflatten(1, (channels, 1, 1)),
                                       nn.Conv2d(channels, channels, 1))
            self.beta = nn.Sequential(nn.Linear(guide_dim, channels), nn.Unflatten(1, (channels, 1, 1)),
                                      nn.Conv2d(channels, channels, 1))

    def forward(self, x, guide):
        """Modulate ``x``.

        Args:
            x (Tensor): (B, C, H, W) features entering a decoder level.
            guide (Tensor): (B, G) guidance vector.

        Returns:
            Tensor: (B, C, H, W).
        """
        if self.mode == 'release':
            gamma, beta = self.affine(guide).chunk(2, dim=1)
            return x * (1 + gamma[:, :, None, None].to(x.dtype)) + beta[:, :, None, None].to(x.dtype)
        gamma = self.gamma(guide).to(x.dtype)
        beta = self.beta(guide).to(x.dtype)
        return x * gamma + beta
