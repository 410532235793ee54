"""Degradation-conditioned blocks (AMIRNet's FTB) and tree-conditioned backbones.

A *conditioned block* replaces the affine parameters of a backbone block by per-sample
values predicted from the degradation representation ``rep`` (B, R) of
:class:`~perceive_ir_plugin.archs.degradation_tree_arch.DegradationTreeEncoder`
(R = 15 by default). Every prediction is one ``nn.Linear(R, C)`` ("conditioning map"):

* :class:`FTB` - AMIRNet's feature transform block, a :class:`NAFBlock` whose two
  LayerNorm affines (weight and bias), two SimpleGate outputs (times a predicted channel
  vector) and residual scales ``beta``/``gamma`` are predicted - 8 maps per block;
* :class:`ConditionalTransformerBlock` - the same idea for Restormer / PromptIR blocks:
  the two channel LayerNorm affines (weight, and bias for ``WithBias``), the GDFN gate
  ``GELU(x1) * x2 * g`` and one residual scale per branch.

``cond_init='identity'`` gives every map zero weights and a bias equal to the value the
plain block uses (its LayerNorm weight/bias, ``beta``/``gamma``; 1 for gates and for the
Restormer residual scales), so the conditioned network computes exactly what the plain one
does until training moves the weights. ``cond_init='default'`` keeps PyTorch's default
``nn.Linear`` initialisation (what the released AMIRNet does).

The registered archs :class:`ConditionedNAFNet`, :class:`ConditionedRestormer` and
:class:`ConditionedPromptIR` are the official backbones with the blocks of ``cond_stages``
converted and a ``degradation_encoder`` added. ``backbone_weights`` loads an official
checkpoint of the plain backbone (through :mod:`perceive_ir_plugin.utils.checkpoint`): its
LayerNorm / ``beta`` / ``gamma`` tensors go into the biases of the maps (see
:func:`retrofit_state_dict`), so the retrofitted network starts output-identical to the
official one.
"""
from collections import OrderedDict
from contextlib import contextmanager

import torch
from torch import nn as nn

from basicsr.utils.registry import ARCH_REGISTRY
from perceive_ir_plugin.archs.arch_util import (BiasFreeLayerNorm, TransformerBlock, gelu_gate, pad_to_multiple,
                                                simple_gate)
from perceive_ir_plugin.archs.degradation_tree_arch import DegradationTreeEncoder
from perceive_ir_plugin.archs.nafnet_arch import NAFBlock, NAFNet
from perceive_ir_plugin.archs.promptir_arch import PromptIR
from perceive_ir_plugin.archs.restormer_arch import Restormer
from perceive_ir_plugin.utils.checkpoint import (CheckpointError, extract_state_dict, format_mismatch,
                                                 load_checkpoint_file, strip_prefix)

COND_INITS = ('identity', 'default')


def conditional_layer_norm(x, weight, bias=None, eps=1e-5):
    """Channel layer norm with per-sample affine (same arithmetic as ``arch_util.channel_layer_norm``).

    Args:
        x (Tensor): (B, C, H, W) features.
        weight (Tensor): (B, C, 1, 1) per-sample scale.
        bias (Tensor, optional): (B, C, 1, 1) per-sample shift; None = Restormer's
            bias-free variant (no mean subtraction, no shift).
        eps (float): Added to the (population) variance.

    Returns:
        Tensor: (B, C, H, W).
    """
    var, mean = torch.var_mean(x, dim=1, keepdim=True, correction=0)
    if bias is None:
        return x * torch.rsqrt(var + eps) * weight
    return (x - mean) * torch.rsqrt(var + eps) * weight + bias


def condition_map(rep_dim, neutral, cond_init):
    """One ``nn.Linear(rep_dim, C)`` conditioning map.

    Args:
        rep_dim (int): Length R of the representation.
        neutral (Tensor): (C,) value the plain block uses; with ``cond_init='identity'``
            the bias is set to it and the weight to zero.
        cond_init (str): ``'identity'`` or ``'default'`` (PyTorch's initialisation).

    Returns:
        nn.Linear: The map.
    """
    if cond_init not in COND_INITS:
        raise ValueError(f"cond_init must be one of {COND_INITS}, got '{cond_init}'.")
    neutral = neutral.detach().reshape(-1)
    linear = nn.Linear(rep_dim, neutral.numel()).to(neutral.device)
    if cond_init == 'identity':
        with torch.no_grad():
            linear.weight.zero_()
            linear.bias.copy_(neutral)
    return linear


class ConditionedBlockMixin:
    """Shared plumbing of the conditioned blocks.

    A subclass lists its maps in :meth:`neutral_values` and the official parameter each
    map's bias comes from in :meth:`retrofit_pairs`. The representation arrives either as
    the ``rep`` argument of ``forward`` or, when the block sits inside a backbone whose
    ``forward`` cannot pass it, through :func:`conditioning` (which sets ``_condition``).
    """

    _condition = None

    def retrofit_pairs(self):
        """list[tuple[str, str]]: (official parameter name, map name) pairs of this block."""
        raise NotImplementedError

    def neutral_values(self):
        """OrderedDict[str, Tensor]: map name -> (C,) value of the plain block."""
        raise NotImplementedError

    def _build_maps(self, rep_dim, cond_init):
        self.rep_dim = int(rep_dim)
        self.cond = nn.ModuleDict(
            (name, condition_map(rep_dim, value, cond_init)) for name, value in self.neutral_values().items())

    def modulation(self, rep=None):
        """Per-sample values of every map.

        Args:
            rep (Tensor, optional): (B, R) representation; default: the one set by
                :func:`conditioning`.

        Returns:
            dict[str, Tensor]: map name -> (B, C, 1, 1).
        """
        rep = self._condition if rep is None else rep
        if rep is None:
            raise RuntimeError(f'{type(self).__name__} needs the degradation representation: pass rep=(B, '
                               f'{self.rep_dim}) or run it inside its conditioned network.')
        if rep.ndim != 2 or rep.shape[1] != self.rep_dim:
            raise ValueError(f'{type(self).__name__} expects a representation of shape (B, {self.rep_dim}), '
                             f'got {tuple(rep.shape)}.')
        return {name: linear(rep)[:, :, None, None] for name, linear in self.cond.items()}

    def unmapped_values(self):
        """OrderedDict[str, Tensor]: neutral values of the maps no official parameter feeds (gates, scales: 1)."""
        official = {name for _, name in self.retrofit_pairs()}
        return OrderedDict((name, torch.ones(linear.out_features)) for name, linear in self.cond.items()
                           if name not in official)

    @classmethod
    def _adopt(cls, block):
        """A new instance of ``cls`` that takes over ``block``'s submodules and parameters."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        for name, child in block.named_children():
            new.add_module(name, child)
        for name, param in block.named_parameters(recurse=False):
            new.register_parameter(name, param)
        return new


class FTB(ConditionedBlockMixin, NAFBlock):
    """AMIRNet's feature transform block: a NAFBlock with per-sample modulation.

    ``LN_a(x) = norm(x) * w_a(rep) + b_a(rep)`` replaces both LayerNorms, each SimpleGate
    output is multiplied by ``g_a(rep)`` and the residual scales are ``beta(rep)`` and
    ``gamma(rep)``; convolutions and the simplified channel attention are NAFNet's. Maps
    (keys ``cond.<name>.weight/bias``): ``norm1_weight``, ``norm1_bias``, ``norm2_weight``,
    ``norm2_bias``, ``gate1``, ``gate2``, ``beta``, ``gamma``.

    Args:
        c (int): Channels C.
        DW_Expand (int): Depthwise-branch width factor. Default 2.
        FFN_Expand (int): Feed-forward width factor. Default 2.
        drop_out_rate (float): Dropout after each branch. Default 0.
        rep_dim (int): Representation length R. Default 15.
        cond_init (str): ``'identity'`` (equals a fresh NAFBlock) or ``'default'``
            (PyTorch init, AMIRNet's choice). Default ``'identity'``.

    Shapes:
        ``forward(x, rep=None)``: x (B, C, H, W), rep (B, R) -> (B, C, H, W).
    """

    def __init__(self, c, DW_Expand=2, FFN_Expand=2, drop_out_rate=0., rep_dim=15, cond_init='identity'):  # noqa: N803
        super().__init__(c, DW_Expand, FFN_Expand, drop_out_rate)
        self._make_conditional(rep_dim, cond_init)

    @classmethod
    def from_block(cls, block, rep_dim=15, cond_init='identity'):
        """Convert a (trained) :class:`NAFBlock`; with ``'identity'`` the output is unchanged.

        The FTB takes over ``block``'s convolutions and attention (also NAFNetLocal's
        local pooling); ``block`` must not be used afterwards.
        """
        ftb = cls._adopt(block)
        ftb._make_conditional(rep_dim, cond_init)
        return ftb

    def _make_conditional(self, rep_dim, cond_init):
        self.eps = self.norm1.eps
        self._neutral = OrderedDict([
            ('norm1_weight', self.norm1.weight), ('norm1_bias', self.norm1.bias),
            ('norm2_weight', self.norm2.weight), ('norm2_bias', self.norm2.bias),
            ('gate1', torch.ones(self.conv3.in_channels, device=self.beta.device)),
            ('gate2', torch.ones(self.conv5.in_channels, device=self.beta.device)),
            ('beta', self.beta), ('gamma', self.gamma)])
        self._build_maps(rep_dim, cond_init)
        del self._neutral, self.norm1, self.norm2, self.beta, self.gamma

    def neutral_values(self):
        return self._neutral

    def retrofit_pairs(self):
        return [('norm1.weight', 'norm1_weight'), ('norm1.bias', 'norm1_bias'), ('norm2.weight', 'norm2_weight'),
                ('norm2.bias', 'norm2_bias'), ('beta', 'beta'), ('gamma', 'gamma')]

    def forward(self, inp, rep=None):
        """(B, C, H, W), optional rep (B, R) -> (B, C, H, W)."""
        m = self.modulation(rep)
        x = conditional_layer_norm(inp, m['norm1_weight'], m['norm1_bias'], self.eps)
        x = simple_gate(self.conv2(self.conv1(x))) * m['gate1']
        x = self.conv3(x * self.sca(x))
        y = inp + self.dropout1(x) * m['beta']
        x = conditional_layer_norm(y, m['norm2_weight'], m['norm2_bias'], self.eps)
        x = self.conv5(simple_gate(self.conv4(x)) * m['gate2'])
        return y + self.dropout2(x) * m['gamma']


class ConditionalTransformerBlock(ConditionedBlockMixin, TransformerBlock):
    """Restormer/PromptIR transformer block with per-sample LayerNorm affine, gate and residual scales.

    ``x + s_attn(rep) * MDTA(LN_1(x))`` then ``x + s_ffn(rep) * project_out(GELU(x1) * x2 * g(rep))``
    with ``LN_a(x) = norm(x) * w_a(rep) (+ b_a(rep) for WithBias)``. Maps: ``norm1_weight``,
    ``norm1_bias`` (WithBias), ``norm2_weight``, ``norm2_bias`` (WithBias), ``gate`` (GDFN
    hidden width), ``attn_scale``, ``ffn_scale``.

    Args:
        dim, num_heads, ffn_expansion_factor, bias, LayerNorm_type: As :class:`TransformerBlock`.
        rep_dim (int): Representation length R. Default 15.
        cond_init (str): ``'identity'`` (equals the plain block) or ``'default'``.

    Shapes:
        ``forward(x, rep=None)``: x (B, dim, H, W), rep (B, R) -> (B, dim, H, W).
    """

    def __init__(self, dim, num_heads, ffn_expansion_factor, bias, LayerNorm_type, rep_dim=15,  # noqa: N803
                 cond_init='identity'):
        super().__init__(dim, num_heads, ffn_expansion_factor, bias, LayerNorm_type)
        self._make_conditional(rep_dim, cond_init)

    @classmethod
    def from_block(cls, block, rep_dim=15, cond_init='identity'):
        """Convert a (trained) :class:`TransformerBlock`; ``block`` must not be used afterwards."""
        new = cls._adopt(block)
        new._make_conditional(rep_dim, cond_init)
        return new

    def _make_conditional(self, rep_dim, cond_init):
        self.bias_free = isinstance(self.norm1.body, BiasFreeLayerNorm)
        dim = self.norm1.body.weight.numel()
        device = self.norm1.body.weight.device
        neutral = OrderedDict([('norm1_weight', self.norm1.body.weight)])
        if not self.bias_free:
            neutral['norm1_bias'] = self.norm1.body.bias
        neutral['norm2_weight'] = self.norm2.body.weight
        if not self.bias_free:
            neutral['norm2_bias'] = self.norm2.body.bias
        neutral['gate'] = torch.ones(self.ffn.project_out.in_channels, device=device)
        neutral['attn_scale'] = torch.ones(dim, device=device)
        neutral['ffn_scale'] = torch.ones(dim, device=device)
        self._neutral = neutral
        self._build_maps(rep_dim, cond_init)
        del self._neutral, self.norm1, self.norm2

    def neutral_values(self):
        return self._neutral

    def retrofit_pairs(self):
        pairs = [('norm1.body.weight', 'norm1_weight'), ('norm2.body.weight', 'norm2_weight')]
        if not self.bias_free:
            pairs += [('norm1.body.bias', 'norm1_bias'), ('norm2.body.bias', 'norm2_bias')]
        return pairs

    def forward(self, x, rep=None):
        """(B, dim, H, W), optional rep (B, R) -> (B, dim, H, W)."""
        m = self.modulation(rep)
        x = x + self.attn(conditional_layer_norm(x, m['norm1_weight'], m.get('norm1_bias'))) * m['attn_scale']
        h = conditional_layer_norm(x, m['norm2_weight'], m.get('norm2_bias'))
        h = gelu_gate(self.ffn.dwconv(self.ffn.project_in(h))) * m['gate']
        return x + self.ffn.project_out(h) * m['ffn_scale']


CONDITIONAL_BLOCKS = ((NAFBlock, FTB), (TransformerBlock, ConditionalTransformerBlock))


@contextmanager
def conditioning(blocks, rep):
    """Make ``rep`` (B, R) the representation of every block in ``blocks`` for the ``with`` body."""
    blocks = list(blocks)
    for block in blocks:
        block._condition = rep
    try:
        yield
    finally:
        for block in blocks:
            block._condition = None


def convert_blocks(module, rep_dim, cond_init):
    """Replace, in place and recursively, every plain block inside ``module`` by its conditioned form.

    Returns:
        int: Number of blocks converted.
    """
    count = 0
    for name, child in list(module.named_children()):
        if isinstance(child, ConditionedBlockMixin):
            continue
        for plain, conditioned in CONDITIONAL_BLOCKS:
            if type(child) is plain:
                setattr(module, name, conditioned.from_block(child, rep_dim, cond_init))
                count += 1
                break
        else:
            count += convert_blocks(child, rep_dim, cond_init)
    return count


# ------------------------------------------------------------------------------------------ retrofit


def official_keys(net):
    """State-dict keys (and shapes) an official checkpoint of ``net``'s plain backbone has.

    Args:
        net (nn.Module): A tree-conditioned network.

    Returns:
        OrderedDict[str, torch.Size]: Official key -> expected shape.
    """
    own = net.state_dict()
    keys = OrderedDict((k, v.shape) for k, v in own.items()
                       if not k.startswith('degradation_encoder.') and '.cond.' not in k)
    for prefix, module in net.named_modules():
        if isinstance(module, ConditionedBlockMixin):
            for official, name in module.retrofit_pairs():
                shape = own[f'{prefix}.cond.{name}.bias'].shape
                keys[f'{prefix}.{official}'] = (torch.Size([1, shape[0], 1, 1])
                                                if official in ('beta', 'gamma') else shape)
    return keys


def retrofit_state_dict(net, official_sd, source='The checkpoint'):
    """Map the state dict of a plain official backbone onto a tree-conditioned network.

    Shared keys are copied; every official LayerNorm weight/bias, ``beta`` and ``gamma``
    of a converted block becomes the bias of its map; maps get zero weights and the
    remaining biases their neutral value (1 for gates and Restormer residual scales);
    the degradation encoder keeps the network's current values.

    Args:
        net (nn.Module): Tree-conditioned network.
        official_sd (dict[str, Tensor]): Official keys (prefixes already stripped).
        source (str): How to name the checkpoint in errors.

    Returns:
        OrderedDict[str, Tensor]: A complete state dict for ``net``.

    Raises:
        CheckpointError: Official keys are missing or unexpected, or shapes differ.
    """
    expected = official_keys(net)
    report = {
        'missing': sorted(set(expected) - set(official_sd)),
        'unexpected': sorted(set(official_sd) - set(expected)),
        'shape': [(k, tuple(s), tuple(official_sd[k].shape)) for k, s in expected.items()
                  if k in official_sd and tuple(official_sd[k].shape) != tuple(s)],
    }
    if any(report.values()):
        raise CheckpointError(f'{source} does not fit the plain backbone of {type(net).__name__}:\n'
                              f'{format_mismatch(report)}')
    out = OrderedDict()
    own = net.state_dict()
    maps = {}
    for prefix, module in net.named_modules():
        if isinstance(module, ConditionedBlockMixin):
            for name, value in module.unmapped_values().items():
                maps[f'{prefix}.cond.{name}'] = value
            for official, name in module.retrofit_pairs():
                maps[f'{prefix}.cond.{name}'] = official_sd[f'{prefix}.{official}'].reshape(-1)
    for key, value in own.items():
        if key in official_sd:
            out[key] = official_sd[key]
        elif key.endswith('.weight') and key[:-len('.weight')] in maps:
            out[key] = torch.zeros_like(value)
        elif key.endswith('.bias') and key[:-len('.bias')] in maps:
            out[key] = maps[key[:-len('.bias')]].to(value.dtype)
        else:
            out[key] = value
    return out


def load_backbone_checkpoint(net, path, param_key=None, trust=False, option_key='network_g.backbone_weights'):
    """Load an official (plain) Restormer / NAFNet / PromptIR checkpoint into a conditioned network.

    Any layout :mod:`perceive_ir_plugin.utils.checkpoint` reads is accepted (BasicSR
    ``params``/``params_ema``, PromptIR's Lightning ``state_dict`` with ``net.``, DDP
    ``module.``, plain). See :func:`retrofit_state_dict` for the mapping.

    Args:
        net (nn.Module): Tree-conditioned network.
        path (str): Checkpoint file.
        param_key (str, optional): Top-level key; None detects it.
        trust (bool): Allow pickled objects (see ``load_checkpoint_file``).
        option_key (str): Option named in error messages.
    """
    checkpoint = load_checkpoint_file(path, trust=trust, option_key=option_key)
    state_dict, _ = extract_state_dict(checkpoint, param_key)
    state_dict, _ = strip_prefix(state_dict, official_keys(net).keys())
    full = retrofit_state_dict(net, state_dict, source=f"Checkpoint '{path}' (option '{option_key}')")
    net.load_state_dict(full, strict=True)


# ------------------------------------------------------------------------------------------ networks


class TreeConditionedMixin:
    """Adds a :class:`DegradationTreeEncoder` to a backbone and conditions the chosen stages on it.

    ``forward(x, return_tree=False)`` encodes ``x``, runs the backbone's own ``forward``
    with the representation given to every conditioned block, and returns the output
    (and the encoder's dict when ``return_tree``).

    Tree options (constructor keywords of every conditioned network):

    Args:
        cond_stages (list[str]): Submodules whose blocks become conditioned.
        branching (int): Tree branching factor. Default 2.
        depth (int): Tree levels including the root. Default 4 (representation length 15).
        encoder_channels (list[int]): Degradation-encoder stage widths. Default [64, 128, 256].
        head_hidden (int): Hidden width of the tree heads. Default 256.
        active_levels (int, optional): Levels feeding the representation (default: all).
        sigmoid_logits (bool): Literal AMIRNet classifier (sigmoid before CE). Default False.
        cond_init (str): ``'identity'`` or ``'default'`` map initialisation.
        backbone_weights (str, optional): Official checkpoint of the plain backbone to
            retrofit (any layout the plugin's loader reads).
        backbone_param_key (str, optional): Its top-level key (None: detected).
        trust_checkpoint (bool): Allow pickled objects in that file. Default False.
    """

    def _attach_tree(self, in_channels, cond_stages, branching, depth, encoder_channels, head_hidden, active_levels,
                     sigmoid_logits, cond_init, backbone_weights, backbone_param_key, trust_checkpoint):
        self.degradation_encoder = DegradationTreeEncoder(
            in_channels=in_channels, channels=encoder_channels, branching=branching, depth=depth,
            head_hidden=head_hidden, active_levels=active_levels, sigmoid_logits=sigmoid_logits)
        rep_dim = self.degradation_encoder.rep_dim
        names = dict(self.named_modules())
        self.cond_stages = list(cond_stages)
        for stage in self.cond_stages:
            if stage not in names or stage == '':
                raise ValueError(f"cond_stages: {type(self).__name__} has no submodule '{stage}'; choose among "
                                 f'{[n for n in dict(self.named_children()) if n != "degradation_encoder"]}.')
            if convert_blocks(names[stage], rep_dim, cond_init) == 0 and not isinstance(
                    names[stage], ConditionedBlockMixin):
                raise ValueError(f"cond_stages: submodule '{stage}' of {type(self).__name__} holds no block to "
                                 'condition.')
        if backbone_weights is not None:
            load_backbone_checkpoint(self, backbone_weights, param_key=backbone_param_key, trust=trust_checkpoint)

    @property
    def rep_dim(self):
        """int: Length of the representation vector."""
        return self.degradation_encoder.rep_dim

    def set_active_levels(self, levels):
        """Number of tree levels (from the root) that feed the representation."""
        self.degradation_encoder.set_active_levels(levels)

    def conditioned_blocks(self):
        """list[nn.Module]: Every conditioned block of the network (found afresh at each call)."""
        return [m for m in self.modules() if isinstance(m, ConditionedBlockMixin)]

    def encoder_input(self, x):
        """What the degradation encoder sees (the network input by default)."""
        return x

    def forward(self, x, return_tree=False):
        """Restore a batch conditioned on its degradation representation.

        Args:
            x (Tensor): (B, C, H, W), RGB, [0, 1] (size rules of the backbone apply).
            return_tree (bool): Also return the encoder outputs.

        Returns:
            Tensor | tuple[Tensor, dict]: (B, C_out, H, W) restored image, and with
            ``return_tree`` the dict of :meth:`DegradationTreeEncoder.forward`.
        """
        tree = self.degradation_encoder(self.encoder_input(x))
        with conditioning(self.conditioned_blocks(), tree['rep']):
            out = super().forward(x)
        return (out, tree) if return_tree else out


def _tree_kwargs(local):
    keys = ('cond_stages', 'branching', 'depth', 'encoder_channels', 'head_hidden', 'active_levels',
            'sigmoid_logits', 'cond_init', 'backbone_weights', 'backbone_param_key', 'trust_checkpoint')
    return {k: local[k] for k in keys}


@ARCH_REGISTRY.register()
class ConditionedNAFNet(TreeConditionedMixin, NAFNet):
    """NAFNet whose blocks in ``cond_stages`` are :class:`FTB` s conditioned on a degradation tree.

    Args:
        img_channel, width, middle_blk_num, enc_blk_nums, dec_blk_nums: As :class:`NAFNet`.
        cond_stages, branching, depth, encoder_channels, head_hidden, active_levels,
        sigmoid_logits, cond_init, backbone_weights, backbone_param_key, trust_checkpoint:
            Tree options, see :class:`TreeConditionedMixin`.

    Shapes:
        ``forward``: (B, img_channel, H, W), any size -> (B, img_channel, H, W).
    """

    def __init__(self,
                 img_channel=3,
                 width=16,
                 middle_blk_num=1,
                 enc_blk_nums=(),
                 dec_blk_nums=(),
                 cond_stages=('encoders', ),
                 branching=2,
                 depth=4,
                 encoder_channels=(64, 128, 256),
                 head_hidden=256,
                 active_levels=None,
                 sigmoid_logits=False,
                 cond_init='identity',
                 backbone_weights=None,
                 backbone_param_key=None,
                 trust_checkpoint=False):
        super().__init__(img_channel, width, middle_blk_num, list(enc_blk_nums), list(dec_blk_nums))
        self._attach_tree(img_channel, **_tree_kwargs(locals()))

    def encoder_input(self, x):
        """The input zero-padded like NAFNet pads it (AMIRNet encodes the padded image)."""
        return pad_to_multiple(x, self.padder_size, mode='constant')[0]


@ARCH_REGISTRY.register()
class ConditionedRestormer(TreeConditionedMixin, Restormer):
    """Restormer whose blocks in ``cond_stages`` are :class:`ConditionalTransformerBlock` s.

    Args:
        inp_channels, out_channels, dim, num_blocks, num_refinement_blocks, heads,
        ffn_expansion_factor, bias, LayerNorm_type, dual_pixel_task: As :class:`Restormer`.
        cond_stages, branching, depth, encoder_channels, head_hidden, active_levels,
        sigmoid_logits, cond_init, backbone_weights, backbone_param_key, trust_checkpoint:
            Tree options, see :class:`TreeConditionedMixin`.

    Shapes:
        ``forward``: (B, inp_channels, H, W), H and W multiples of 8 -> (B, out_channels, H, W).
    """

    def __init__(self,
                 inp_channels=3,
                 out_channels=3,
                 dim=48,
                 num_blocks=(4, 6, 6, 8),
                 num_refinement_blocks=4,
                 heads=(1, 2, 4, 8),
                 ffn_expansion_factor=2.66,
                 bias=False,
                 LayerNorm_type='WithBias',  # noqa: N803 (official option name)
                 dual_pixel_task=False,
                 cond_stages=('encoder_level1', 'encoder_level2', 'encoder_level3'),
                 branching=2,
                 depth=4,
                 encoder_channels=(64, 128, 256),
                 head_hidden=256,
                 active_levels=None,
                 sigmoid_logits=False,
                 cond_init='identity',
                 backbone_weights=None,
                 backbone_param_key=None,
                 trust_checkpoint=False):
        super().__init__(inp_channels, out_channels, dim, list(num_blocks), num_refinement_blocks, list(heads),
                         ffn_expansion_factor, bias, LayerNorm_type, dual_pixel_task)
        self._attach_tree(inp_channels, **_tree_kwargs(locals()))


@ARCH_REGISTRY.register()
class ConditionedPromptIR(TreeConditionedMixin, PromptIR):
    """PromptIR whose blocks in ``cond_stages`` are :class:`ConditionalTransformerBlock` s.

    Args:
        inp_channels, out_channels, dim, num_blocks, num_refinement_blocks, heads,
        ffn_expansion_factor, bias, LayerNorm_type, decoder: As :class:`PromptIR`
        (``decoder`` defaults to True here, as every official script uses it).
        cond_stages, branching, depth, encoder_channels, head_hidden, active_levels,
        sigmoid_logits, cond_init, backbone_weights, backbone_param_key, trust_checkpoint:
            Tree options, see :class:`TreeConditionedMixin`.

    Shapes:
        ``forward``: (B, inp_channels, H, W), H and W multiples of 8 -> (B, out_channels, H, W).
    """

    def __init__(self,
                 inp_channels=3,
                 out_channels=3,
                 dim=48,
                 num_blocks=(4, 6, 6, 8),
                 num_refinement_blocks=4,
                 heads=(1, 2, 4, 8),
                 ffn_expansion_factor=2.66,
                 bias=False,
                 LayerNorm_type='WithBias',  # noqa: N803 (official option name)
                 decoder=True,
                 cond_stages=('encoder_level1', 'encoder_level2', 'encoder_level3'),
                 branching=2,
                 depth=4,
                 encoder_channels=(64, 128, 256),
                 head_hidden=256,
                 active_levels=None,
                 sigmoid_logits=False,
                 cond_init='identity',
                 backbone_weights=None,
                 backbone_param_key=None,
                 trust_checkpoint=False):
        super().__init__(inp_channels, out_channels, dim, list(num_blocks), num_refinement_blocks, list(heads),
                         ffn_expansion_factor, bias, LayerNorm_type, decoder)
        self._attach_tree(inp_channels, **_tree_kwargs(locals()))
