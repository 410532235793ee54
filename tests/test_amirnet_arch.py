"""AMIRNet archs: FTB, conditioned Restormer/PromptIR blocks, step-0 retrofit identity, AMIRNet layout."""
import copy
import inspect

import pytest
import torch

from basicsr.utils.registry import ARCH_REGISTRY
from perceive_ir_plugin.archs.arch_util import TransformerBlock
from perceive_ir_plugin.archs.conditioning_arch import FTB, ConditionalTransformerBlock, official_keys
from perceive_ir_plugin.archs.nafnet_arch import NAFBlock, NAFNet
from perceive_ir_plugin.archs.promptir_arch import PromptIR
from perceive_ir_plugin.archs.restormer_arch import Restormer
from perceive_ir_plugin.utils.checkpoint import CheckpointError

TREE = dict(encoder_channels=[8, 8, 16], head_hidden=16)


def randomize_(net, seed=0, scale=0.2):
    """Random values everywhere (NAFNet's beta/gamma start at zero, LayerNorms at 1/0)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * scale + (1.0 if p.ndim == 1 else 0.0))
    return net


def test_ftb_with_neutral_conditioning_equals_nafblock():
    block = randomize_(NAFBlock(8)).eval()
    x = torch.randn(3, 8, 9, 11)
    ref = block(x)
    ftb = FTB.from_block(copy.deepcopy(block))
    assert sorted(ftb.cond) == ['beta', 'gamma', 'gate1', 'gate2', 'norm1_bias', 'norm1_weight', 'norm2_bias',
                                'norm2_weight']
    assert all(lin.weight.shape == (8, 15) for lin in ftb.cond.values())
    assert not any(k.startswith(('norm1', 'norm2', 'beta', 'gamma')) for k in ftb.state_dict())
    assert torch.equal(ftb.cond['norm1_weight'].bias, block.norm1.weight)
    assert torch.equal(ftb.cond['beta'].bias, block.beta.flatten())
    assert torch.equal(ftb(x, torch.randn(3, 15)), ref)  # any representation: maps have zero weight
    # a fresh FTB with identity init is a fresh NAFBlock; the maps are trainable functions of rep
    fresh = FTB(8)
    plain = NAFBlock(8)
    plain.load_state_dict({k: v for k, v in fresh.state_dict().items() if '.cond.' not in k and 'cond.' not in k},
                          strict=False)
    rep = torch.randn(3, 15, requires_grad=True)
    assert torch.equal(fresh(x, rep), x)  # beta = gamma = 0: identity, like NAFBlock
    torch.nn.init.normal_(fresh.cond['beta'].weight)
    out = fresh(x, rep)
    out.sum().backward()
    assert rep.grad.abs().sum() > 0 and not torch.allclose(out[0] - x[0], out[1] - x[1])
    with pytest.raises(RuntimeError, match=r'needs the degradation representation: pass rep=\(B, 15\)'):
        fresh(x)
    with pytest.raises(ValueError, match=r'expects a representation of shape \(B, 15\), got \(3, 7\)'):
        fresh(x, torch.randn(3, 7))


@pytest.mark.parametrize('norm', ['WithBias', 'BiasFree'])
def test_conditional_transformer_block_neutral_equals_plain(norm):
    block = randomize_(TransformerBlock(16, 2, 2.66, False, norm)).eval()
    x = torch.randn(2, 16, 8, 8)
    cond = ConditionalTransformerBlock.from_block(copy.deepcopy(block))
    expected_maps = {'norm1_weight', 'norm2_weight', 'gate', 'attn_scale', 'ffn_scale'}
    if norm == 'WithBias':
        expected_maps |= {'norm1_bias', 'norm2_bias'}
    assert set(cond.cond) == expected_maps
    assert cond.cond['gate'].out_features == 42  # GDFN hidden width int(16 * 2.66)
    assert torch.equal(cond(x, torch.randn(2, 15)), block(x))


def _official_file(tmp_path, plain, layout):
    sd = {k: v.clone() for k, v in plain.state_dict().items()}
    path = str(tmp_path / f'official_{layout}.pth')
    if layout == 'lightning':  # PromptIR's release: state_dict with a `net.` prefix
        torch.save({'state_dict': {f'net.{k}': v for k, v in sd.items()}, 'epoch': 119}, path)
    else:
        torch.save({'params': sd}, path)
    return path


ADAPTER_CASES = {
    'nafnet': ('ConditionedNAFNet', NAFNet, dict(width=8, enc_blk_nums=[1, 2], dec_blk_nums=[1, 1]), 'basicsr',
               (2, 3, 19, 23)),
    'restormer': ('ConditionedRestormer', Restormer, dict(dim=8, num_blocks=[1, 1, 1, 1], num_refinement_blocks=1,
                                                          heads=[1, 2, 2, 4]), 'basicsr', (2, 3, 16, 24)),
    'restormer_biasfree': ('ConditionedRestormer', Restormer,
                           dict(dim=8, num_blocks=[1, 1, 1, 1], num_refinement_blocks=1, heads=[1, 2, 2, 4],
                                LayerNorm_type='BiasFree'), 'basicsr', (1, 3, 16, 16)),
    'promptir': ('ConditionedPromptIR', PromptIR, dict(num_blocks=[1, 1, 1, 1], num_refinement_blocks=1, decoder=True),
                 'lightning', (1, 3, 16, 16)),
}


@pytest.mark.parametrize('case', sorted(ADAPTER_CASES))
def test_adapter_retrofit_is_output_identical_at_step0(case, tmp_path):
    arch, plain_cls, cfg, layout, shape = ADAPTER_CASES[case]
    torch.manual_seed(0)
    plain = randomize_(plain_cls(**cfg), scale=0.1).eval()
    path = _official_file(tmp_path, plain, layout)
    net = ARCH_REGISTRY.get(arch)(**cfg, **TREE, backbone_weights=path).eval()
    blocks = net.conditioned_blocks()
    assert len(blocks) == 3  # the encoder blocks (NAFNet: 1 + 2; Restormer/PromptIR: levels 1-3)
    # the official affine values went into the biases, the weights are zero
    first = blocks[0]
    official = plain.state_dict()
    prefix = next(n for n, m in net.named_modules() if m is first)
    for off, name in first.retrofit_pairs():
        assert torch.equal(first.cond[name].bias, official[f'{prefix}.{off}'].flatten())
        assert first.cond[name].weight.abs().sum() == 0
    # every shared key was loaded unchanged
    own = net.state_dict()
    assert all(torch.equal(own[k], v) for k, v in official.items() if k in own)
    assert set(official_keys(net)) == set(official)
    x = torch.rand(shape)
    with torch.no_grad():
        assert torch.allclose(net(x), plain(x), atol=1e-6, rtol=0)
        out, tree = net(x, return_tree=True)
    assert tree['rep'].shape == (shape[0], 15) and out.shape == x.shape


def test_retrofit_mismatch_names_the_option(tmp_path):
    plain = NAFNet(width=8, enc_blk_nums=[1], dec_blk_nums=[1])
    path = _official_file(tmp_path, plain, 'basicsr')
    message = r"(?s)option 'network_g.backbone_weights'\) does not fit the plain backbone.*shape difference"
    with pytest.raises(CheckpointError, match=message):
        ARCH_REGISTRY.get('ConditionedNAFNet')(width=16, enc_blk_nums=[1], dec_blk_nums=[1], **TREE,
                                                backbone_weights=path)
    with pytest.raises(FileNotFoundError, match='network_g.backbone_weights'):
        ARCH_REGISTRY.get('ConditionedNAFNet')(width=8, enc_blk_nums=[1], dec_blk_nums=[1], **TREE,
                                                backbone_weights=str(tmp_path / 'missing.pth'))
    with pytest.raises(ValueError, match="cond_stages: ConditionedRestormer has no submodule 'encoders'"):
        ARCH_REGISTRY.get('ConditionedRestormer')(dim=8, num_blocks=[1, 1, 1, 1], num_refinement_blocks=1, **TREE,
                                                   cond_stages=['encoders'])


def test_amirnet_layout_defaults_and_parameter_budget():
    amir = ARCH_REGISTRY.get('AMIRNet')
    defaults = {k: p.default for k, p in inspect.signature(amir).parameters.items()}
    assert defaults['width'] == 64 and list(defaults['enc_blk_nums']) == [1, 1, 1, 28]
    assert defaults['middle_blk_num'] == 1 and list(defaults['dec_blk_nums']) == [1, 1, 1, 1]
    assert defaults['depth'] == 4 and defaults['branching'] == 2 and defaults['cond_init'] == 'default'
    cfg = dict(width=8, enc_blk_nums=[1, 2], dec_blk_nums=[1, 1], middle_blk_num=1)
    net = amir(**cfg, **TREE)
    # FTBs exactly in the encoder; middle and decoder blocks stay plain NAFBlocks
    assert all(type(b) is FTB for stage in net.encoders for b in stage)
    assert all(type(b) is NAFBlock for b in list(net.middle_blks) + [b for s in net.decoders for b in s])
    plain = NAFNet(**cfg)
    ftb_channels = 8 * 1 + 16 * 2
    n = sum(p.numel() for p in net.parameters())
    n_plain = sum(p.numel() for p in plain.parameters())
    n_enc = sum(p.numel() for p in net.degradation_encoder.parameters())
    # 8 maps of 16 * C (15 weights + 1 bias per channel) replace 6 affine vectors of C per FTB
    assert n == n_plain - 6 * ftb_channels + 8 * 16 * ftb_channels + n_enc
    x = torch.rand(2, 3, 13, 18)
    net.set_active_levels(2)
    out, tree = net(x, return_tree=True)
    assert out.shape == x.shape and torch.count_nonzero(tree['rep'][:, 3:]) == 0
    assert int(net.state_dict()['degradation_encoder.active_levels']) == 2
