"""Building blocks shared by the plugin's restoration backbones.

Functional pieces (no parameters) come first, then the modules built from them. The
module attribute names (``body``, ``weight``, ``bias``, ``temperature``, ``qkv``,
``qkv_dwconv``, ``project_in``, ``dwconv``, ``project_out``, ``norm1``, ``attn``,
``norm2``, ``ffn``, ``proj``) are those of the official Restormer / PromptIR / NAFNet
code, so the state-dict keys of every network built from them match the released
checkpoints.

Tensor convention everywhere: feature maps are ``(B, C, H, W)``.
"""
import torch
from torch import nn as nn
from torch.nn import functional as F

LAYER_NORM_TYPES = ('WithBias', 'BiasFree')
PAD_MODES = ('reflect', 'replicate', 'constant')

# ----------------------------------------------------------------------------------------------
# Functional pieces
# ----------------------------------------------------------------------------------------------


def channel_layer_norm(x, weight, bias=None, eps=1e-5):
    """Layer normalisation over the channel axis of a feature map, per pixel.

    With ``bias`` given this is the usual layer norm (Restormer "WithBias", NAFNet
    ``LayerNorm2d``): ``(x - mean) / sqrt(var + eps) * weight + bias``. With ``bias=None``
    it is Restormer's "BiasFree" variant, which divides by the standard deviation but does
    **not** subtract the mean: ``x / sqrt(var + eps) * weight``. The variance is always the
    biased (population) variance around the mean.

    Args:
        x (Tensor): (B, C, H, W) features.
        weight (Tensor): (C,) scale.
        bias (Tensor, optional): (C,) shift; None selects the bias-free variant.
        eps (float): Added to the variance. Restormer uses 1e-5, NAFNet 1e-6.

    Returns:
        Tensor: (B, C, H, W), same dtype as ``x``.
    """
    var, mean = torch.var_mean(x, dim=1, keepdim=True, correction=0)
    scale = weight.view(1, -1, 1, 1)
    if bias is None:
        return x * torch.rsqrt(var + eps) * scale
    return (x - mean) * torch.rsqrt(var + eps) * scale + bias.view(1, -1, 1, 1)


def transposed_attention(q, k, v, num_heads, temperature):
    """Multi-head "transposed" (channel) attention of Restormer's MDTA.

    Per head, queries and keys are the head's channels seen as vectors over all pixels.
    They are L2-normalised over the pixels, their (C/heads x C/heads) cosine matrix is
    multiplied by the head's temperature and soft-maxed over the key channels, and the
    result mixes the value channels. Cost is linear in H*W. ``q`` may come from another
    source than ``k`` and ``v`` (cross attention) as long as the shapes agree.

    Args:
        q (Tensor): (B, C, H, W) queries.
        k (Tensor): (B, C, H, W) keys.
        v (Tensor): (B, C, H, W) values.
        num_heads (int): Number of heads; must divide C.
        temperature (Tensor): (num_heads, 1, 1) learnable scale per head.

    Returns:
        Tensor: (B, C, H, W) attended values.
    """
    b, c, h, w = v.shape
    if c % num_heads:
        raise ValueError(f'transposed_attention: {c} channels cannot be split into {num_heads} heads.')
    q = F.normalize(q.reshape(b, num_heads, c // num_heads, h * w), dim=-1)
    k = F.normalize(k.reshape(b, num_heads, c // num_heads, h * w), dim=-1)
    v = v.reshape(b, num_heads, c // num_heads, h * w)
    attn = torch.softmax((q @ k.transpose(-2, -1)) * temperature, dim=-1)
    return (attn @ v).reshape(b, c, h, w)


def simple_gate(x):
    """NAFNet's SimpleGate: split the channels in two halves and multiply them.

    Args:
        x (Tensor): (B, 2C, H, W).

    Returns:
        Tensor: (B, C, H, W) = first half * second half.
    """
    x1, x2 = x.chunk(2, dim=1)
    return x1 * x2


def gelu_gate(x):
    """Gate of Restormer's GDFN: ``GELU(first half) * second half`` (exact, erf GELU).

    Args:
        x (Tensor): (B, 2C, H, W).

    Returns:
        Tensor: (B, C, H, W).
    """
    x1, x2 = x.chunk(2, dim=1)
    return F.gelu(x1) * x2


def pad_to_multiple(x, multiple, mode='reflect'):
    """Pad a batch at the bottom and right so that H and W are multiples of ``multiple``.

    This is the padding the official Restormer / PromptIR test scripts apply (bottom/right,
    reflect) and NAFNet applies inside its forward (bottom/right, zeros). Crop the result
    back with ``out[..., :h, :w]``.

    Args:
        x (Tensor): (B, C, H, W).
        multiple (int): Required divisor of H and W (>= 1; 1 returns ``x`` unchanged).
        mode (str): ``'reflect'``, ``'replicate'`` or ``'constant'`` (zeros). A reflect
            padding that is not possible (pad >= size, i.e. a tiny image) falls back to
            ``'replicate'``.

    Returns:
        tuple[Tensor, tuple[int, int]]: The padded (B, C, H', W') tensor and the original
        ``(H, W)``.
    """
    if mode not in PAD_MODES:
        raise ValueError(f'pad_to_multiple: mode must be one of {PAD_MODES}, got {mode!r}.')
    multiple = int(multiple)
    if multiple < 1:
        raise ValueError(f'pad_to_multiple: multiple must be >= 1, got {multiple}.')
    h, w = x.shape[-2:]
    pad_h = (multiple - h % multiple) % multiple
    pad_w = (multiple - w % multiple) % multiple
    if pad_h == 0 and pad_w == 0:
        return x, (h, w)
    if mode == 'reflect' and (pad_h >= h or pad_w >= w):
        mode = 'replicate'
    return F.pad(x, (0, pad_w, 0, pad_h), mode=mode), (h, w)


def check_size_multiple(x, multiple, arch_name):
    """Raise a clear error when the spatial size of ``x`` is not a multiple of ``multiple``.

    Args:
        x (Tensor): (B, C, H, W) input.
        multiple (int): Required divisor of H and W.
        arch_name (str): Network name quoted in the message.
    """
    h, w = x.shape[-2:]
    if h % multiple or w % multiple:
        raise ValueError(f'{arch_name} needs H and W divisible by {multiple}, got {h}x{w}. Pad the input first '
                         f'(perceive_ir_plugin.archs.arch_util.pad_to_multiple, or the model test path, which '
                         f'pads to the network\'s size_multiple) and crop the output back.')


# ----------------------------------------------------------------------------------------------
# Normalisation
# ----------------------------------------------------------------------------------------------


class BiasFreeLayerNorm(nn.Module):
    """Restormer's bias-free channel layer norm (no mean subtraction, no shift).

    Args:
        dim (int): Number of channels C.
    """

    def __init__(self, dim):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        """(B, C, H, W) -> (B, C, H, W)."""
        return channel_layer_norm(x, self.weight, None, eps=1e-5)


class WithBiasLayerNorm(nn.Module):
    """Restormer's standard channel layer norm (eps 1e-5) with scale and shift.

    Args:
        dim (int): Number of channels C.
    """

    def __init__(self, dim):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        """(B, C, H, W) -> (B, C, H, W)."""
        return channel_layer_norm(x, self.weight, self.bias, eps=1e-5)


class ChannelLayerNorm(nn.Module):
    """Restormer's ``LayerNorm(dim, LayerNorm_type)``: a channel layer norm held in ``body``.

    The wrapper exists so that state-dict keys read ``<name>.body.weight`` /
    ``<name>.body.bias`` as in the official checkpoints.

    Args:
        dim (int): Number of channels C.
        LayerNorm_type (str): ``'WithBias'`` or ``'BiasFree'``.
    """

    def __init__(self, dim, LayerNorm_type='WithBias'):  # noqa: N803 (official option name)
        super().__init__()
        if LayerNorm_type not in LAYER_NORM_TYPES:
            raise ValueError(f'LayerNorm_type must be one of {LAYER_NORM_TYPES}, got {LayerNorm_type!r}.')
        self.body = BiasFreeLayerNorm(dim) if LayerNorm_type == 'BiasFree' else WithBiasLayerNorm(dim)

    def forward(self, x):
        """(B, C, H, W) -> (B, C, H, W)."""
        return self.body(x)


class LayerNorm2d(nn.Module):
    """NAFNet's channel layer norm (parameters ``weight``/``bias``, eps 1e-6).

    Written with ordinary differentiable ops; autograd yields the same gradients as the
    hand-written backward of the official code.

    Args:
        channels (int): Number of channels C.
        eps (float): Added to the variance. Default: 1e-6.
    """

    def __init__(self, channels, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x):
        """(B, C, H, W) -> (B, C, H, W)."""
        return channel_layer_norm(x, self.weight, self.bias, eps=self.eps)


# ----------------------------------------------------------------------------------------------
# Restormer / PromptIR blocks
# ----------------------------------------------------------------------------------------------


class TransposedAttention(nn.Module):
    """Multi-Dconv head Transposed self-Attention (MDTA) of Restormer.

    1x1 conv C -> 3C, depthwise 3x3 conv, split into q, k, v, :func:`transposed_attention`
    with a learnable per-head temperature (initialised to 1), 1x1 output projection.

    Args:
        dim (int): Channels C.
        num_heads (int): Heads; must divide C.
        bias (bool): Whether the convolutions have biases.
    """

    def __init__(self, dim, num_heads, bias):
        super().__init__()
        self.num_heads = num_heads
        self.temperature = nn.Parameter(torch.ones(num_heads, 1, 1))
        self.qkv = nn.Conv2d(dim, dim * 3, kernel_size=1, bias=bias)
        self.qkv_dwconv = nn.Conv2d(dim * 3, dim * 3, kernel_size=3, padding=1, groups=dim * 3, bias=bias)
        self.project_out = nn.Conv2d(dim, dim, kernel_size=1, bias=bias)

    def forward(self, x):
        """(B, C, H, W) -> (B, C, H, W)."""
        q, k, v = self.qkv_dwconv(self.qkv(x)).chunk(3, dim=1)
        return self.project_out(transposed_attention(q, k, v, self.num_heads, self.temperature))


class GatedDconvFeedForward(nn.Module):
    """Gated-Dconv Feed-forward Network (GDFN) of Restormer.

    1x1 conv C -> 2h with h = int(C * ffn_expansion_factor), depthwise 3x3 conv,
    :func:`gelu_gate`, 1x1 conv h -> C.

    Args:
        dim (int): Channels C.
        ffn_expansion_factor (float): Hidden width factor (Restormer: 2.66).
        bias (bool): Whether the convolutions have biases.
    """

    def __init__(self, dim, ffn_expansion_factor, bias):
        super().__init__()
        hidden = int(dim * ffn_expansion_factor)
        self.project_in = nn.Conv2d(dim, hidden * 2, kernel_size=1, bias=bias)
        self.dwconv = nn.Conv2d(hidden * 2, hidden * 2, kernel_size=3, padding=1, groups=hidden * 2, bias=bias)
        self.project_out = nn.Conv2d(hidden, dim, kernel_size=1, bias=bias)

    def forward(self, x):
        """(B, C, H, W) -> (B, C, H, W)."""
        return self.project_out(gelu_gate(self.dwconv(self.project_in(x))))


class TransformerBlock(nn.Module):
    """Restormer transformer block: ``x + MDTA(LN(x))`` then ``x + GDFN(LN(x))``.

    Args:
        dim (int): Channels C.
        num_heads (int): Attention heads; must divide C.
        ffn_expansion_factor (float): GDFN hidden width factor.
        bias (bool): Whether the convolutions have biases.
        LayerNorm_type (str): ``'WithBias'`` or ``'BiasFree'``.
    """

    def __init__(self, dim, num_heads, ffn_expansion_factor, bias, LayerNorm_type):  # noqa: N803
        super().__init__()
        self.norm1 = ChannelLayerNorm(dim, LayerNorm_type)
        self.attn = TransposedAttention(dim, num_heads, bias)
        self.norm2 = ChannelLayerNorm(dim, LayerNorm_type)
        self.ffn = GatedDconvFeedForward(dim, ffn_expansion_factor, bias)

    def forward(self, x):
        """(B, C, H, W) -> (B, C, H, W)."""
        x = x + self.attn(self.norm1(x))
        return x + self.ffn(self.norm2(x))


def transformer_stage(num_blocks, dim, num_heads, ffn_expansion_factor, bias, LayerNorm_type):  # noqa: N803
    """``num_blocks`` :class:`TransformerBlock` in an ``nn.Sequential`` (keys ``<i>.norm1...``).

    Returns:
        nn.Sequential: The stage, (B, dim, H, W) -> (B, dim, H, W).
    """
    return nn.Sequential(*[
        TransformerBlock(dim, num_heads, ffn_expansion_factor, bias, LayerNorm_type) for _ in range(num_blocks)
    ])


class OverlapPatchEmbed(nn.Module):
    """Restormer's shallow feature extraction: one 3x3 conv (held in ``proj``).

    Args:
        in_c (int): Input channels.
        embed_dim (int): Output channels.
        bias (bool): Conv bias. Default: False.
    """

    def __init__(self, in_c=3, embed_dim=48, bias=False):
        super().__init__()
        self.proj = nn.Conv2d(in_c, embed_dim, kernel_size=3, padding=1, bias=bias)

    def forward(self, x):
        """(B, in_c, H, W) -> (B, embed_dim, H, W)."""
        return self.proj(x)


class Downsample(nn.Module):
    """Restormer down-sampling: 3x3 conv C -> C/2 then PixelUnshuffle(2) (held in ``body``).

    Args:
        n_feat (int): Input channels C.
    """

    def __init__(self, n_feat):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(n_feat, n_feat // 2, kernel_size=3, padding=1, bias=False), nn.PixelUnshuffle(2))

    def forward(self, x):
        """(B, C, H, W) -> (B, 2C, H/2, W/2); H and W must be even."""
        return self.body(x)


class Upsample(nn.Module):
    """Restormer up-sampling: 3x3 conv C -> 2C then PixelShuffle(2) (held in ``body``).

    Args:
        n_feat (int): Input channels C.
    """

    def __init__(self, n_feat):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(n_feat, n_feat * 2, kernel_size=3, padding=1, bias=False), nn.PixelShuffle(2))

    def forward(self, x):
        """(B, C, H, W) -> (B, C/2, 2H, 2W)."""
        return self.body(x)


# ----------------------------------------------------------------------------------------------
# NAFNet pieces
# ----------------------------------------------------------------------------------------------


class SimpleGate(nn.Module):
    """Module form of :func:`simple_gate`: (B, 2C, H, W) -> (B, C, H, W)."""

    def forward(self, x):
        return simple_gate(x)
