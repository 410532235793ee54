"""Official backbones (Restormer, NAFNet, NAFNetLocal, PromptIR): keys, numerics, padding, TLC.

Reference data (``tests/data/backbones``, see its README) was produced by running the official code.
"""
import inspect
import json
import os
import zlib

import pytest
import torch
from torch.nn import functional as F

from basicsr.archs import build_network
from basicsr.utils.registry import ARCH_REGISTRY
from perceive_ir_plugin.archs import arch_util
from perceive_ir_plugin.archs.nafnet_arch import LocalAvgPool2d, NAFNet, NAFNetLocal
from perceive_ir_plugin.archs.promptir_arch import PromptIR
from perceive_ir_plugin.archs.restormer_arch import Restormer

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data', 'backbones')
with open(os.path.join(DATA, 'cases.json')) as f:
    CASES = json.load(f)
with open(os.path.join(DATA, 'official_state_dicts.json')) as f:
    OFFICIAL = json.load(f)['configs']

TINY_NAFNET = dict(img_channel=3, width=8, middle_blk_num=1, enc_blk_nums=[1, 1], dec_blk_nums=[1, 1])


def deterministic_weights(shapes, scale):
    """The reference recipe: per sorted key, float64 normal from a CRC32-seeded generator, times scale."""
    weights = {}
    for key in sorted(shapes):
        gen = torch.Generator().manual_seed(zlib.crc32(key.encode()))
        weights[key] = torch.randn(tuple(shapes[key]), generator=gen, dtype=torch.float64).float() * scale
    return weights


def randomize_(net, seed=0, scale=0.2):
    """Give every parameter (including NAFNet's zero-initialised beta/gamma) random values."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * scale)
    return net


# ----------------------------------------------------------------------------------------------
# Equivalence with the official implementations
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize('case', sorted(CASES))
def test_reference_case_matches_official_output(case):
    spec = CASES[case]
    net = ARCH_REGISTRY.get(spec['arch_type'])(**spec['config'])
    assert {k: list(v.shape) for k, v in net.state_dict().items()} == spec['state_dict_shapes']
    net.load_state_dict(deterministic_weights(spec['state_dict_shapes'], spec['weight_scale']), strict=True)
    ref = torch.load(os.path.join(DATA, f'{case}.pt'))
    assert list(ref['input'].shape) == spec['input_shape']
    with torch.no_grad():
        out = net.eval()(ref['input'])
    assert out.shape == ref['output'].shape
    assert (out - ref['output']).abs().max().item() < 1e-4


@pytest.mark.parametrize('config_id', sorted(OFFICIAL))
def test_official_config_has_identical_ordered_keys_shapes_and_param_count(config_id):
    spec = OFFICIAL[config_id]
    with torch.device('meta'):  # no memory or time spent on the 26M-116M parameter networks
        net = ARCH_REGISTRY.get(spec['arch_class'])(**spec['config'])
    sd = net.state_dict()
    assert [(k, list(v.shape)) for k, v in sd.items()] == list(spec['state_dict'].items())
    assert len(sd) == spec['num_keys']
    assert sum(p.numel() for p in net.parameters()) == spec['num_params']
    assert not list(net.buffers())
    if spec['arch_class'] == 'NAFNetLocal':  # the GoPro weights also load into plain NAFNet
        with torch.device('meta'):
            plain = NAFNet(**spec['config'])
        assert [(k, v.shape) for k, v in plain.state_dict().items()] == [(k, v.shape) for k, v in sd.items()]


@pytest.mark.parametrize('cls,config_id', [(Restormer, 'Restormer_WithBias_default'),
                                           (NAFNet, 'NAFNet_SIDD_width32'),
                                           (PromptIR, 'PromptIR_official_decoder_true')])
def test_constructor_signature_is_the_official_one(cls, config_id):
    params = inspect.signature(cls.__init__).parameters
    got = [(p.name, p.default if not isinstance(p.default, tuple) else list(p.default))
           for p in list(params.values())[1:]]
    assert got == [(p['name'], p['default']) for p in OFFICIAL[config_id]['constructor_signature']]


def test_nafnet_local_signature_adds_keyword_only_tlc_options():
    params = inspect.signature(NAFNetLocal.__init__).parameters
    plain = list(inspect.signature(NAFNet.__init__).parameters.values())
    assert [(p.name, p.default) for p in list(params.values())[:len(plain)]] == [(p.name, p.default) for p in plain]
    assert params['train_size'].kind is inspect.Parameter.KEYWORD_ONLY
    assert params['train_size'].default == (1, 3, 256, 256)
    assert params['fast_imp'].kind is inspect.Parameter.KEYWORD_ONLY and params['fast_imp'].default is False


# ----------------------------------------------------------------------------------------------
# Registry, build_network, size multiples
# ----------------------------------------------------------------------------------------------


def test_registry_lookup_by_type_name():
    for cls in (Restormer, NAFNet, NAFNetLocal, PromptIR):
        assert ARCH_REGISTRY.get(cls.__name__) is cls


def test_build_network_passes_constructor_options():
    restormer = build_network({'type': 'Restormer', 'dim': 8, 'num_blocks': [1, 1, 1, 1], 'num_refinement_blocks': 1,
                               'LayerNorm_type': 'BiasFree', 'inp_channels': 6, 'dual_pixel_task': True})
    keys = restormer.state_dict()
    assert not [k for k in keys if k.endswith('body.bias')]
    assert keys['patch_embed.proj.weight'].shape == (8, 6, 3, 3) and 'skip_conv.weight' in keys

    local = build_network(dict(TINY_NAFNET, type='NAFNetLocal', train_size=[1, 3, 24, 40], fast_imp=True))
    assert isinstance(local, NAFNetLocal) and local.fast_imp and local.base_size == (36, 60)
    assert local.encoders[0][0].sca[0].kernel_size == (36, 60)

    promptir = build_network({'type': 'PromptIR', 'num_blocks': [1, 1, 1, 1], 'num_refinement_blocks': 1,
                              'decoder': True})
    assert promptir.decoder and promptir.prompt3.prompt_param.shape == (1, 5, 320, 16, 16)


def test_size_multiple_attributes():
    assert (Restormer.size_multiple, PromptIR.size_multiple) == (8, 8)
    assert (NAFNet.size_multiple, NAFNetLocal.size_multiple) == (1, 1)


def test_restormer_rejects_sizes_that_are_not_multiples_of_8():
    net = Restormer(dim=8, num_blocks=[1, 1, 1, 1], num_refinement_blocks=1).eval()
    with torch.no_grad():
        assert net(torch.rand(1, 3, 16, 24)).shape == (1, 3, 16, 24)
        with pytest.raises(ValueError, match=r'Restormer needs H and W divisible by 8, got 30x30'):
            net(torch.rand(1, 3, 30, 30))


def test_restormer_residual_and_dual_pixel_skip():
    """Zeroing the output conv exposes the global residual (normal) / its absence (dual-pixel)."""
    x = torch.rand(2, 6, 16, 16)
    normal = Restormer(inp_channels=6, out_channels=6, dim=8, num_blocks=[1, 1, 1, 1], num_refinement_blocks=1)
    dual = Restormer(inp_channels=6, out_channels=3, dim=8, num_blocks=[1, 1, 1, 1], num_refinement_blocks=1,
                     dual_pixel_task=True)
    with torch.no_grad():
        normal.output.weight.zero_()
        dual.output.weight.zero_()
        assert torch.equal(normal.eval()(x), x)
        assert torch.equal(dual.eval()(x), torch.zeros(2, 3, 16, 16))


# ----------------------------------------------------------------------------------------------
# NAFNet padding and TLC
# ----------------------------------------------------------------------------------------------


def test_nafnet_any_size_is_zero_padded_bottom_right_and_cropped():
    net = randomize_(NAFNet(**TINY_NAFNET)).eval()
    x = torch.rand(2, 3, 37, 45)
    with torch.no_grad():
        out = net(x)
        padded = net(F.pad(x, (0, 3, 0, 3)))  # 40 x 48: multiples of 2**2, no internal padding
    assert out.shape == x.shape
    assert torch.allclose(out, padded[:, :, :37, :45], atol=1e-6)


def naive_tlc_reference(net, kernels):
    """NAFNet whose SCA pools are a direct stride-1 average pool + replicate padding (TLC by definition)."""

    class NaiveLocalPool(torch.nn.Module):

        def __init__(self, kernel):
            super().__init__()
            self.kernel = kernel

        def forward(self, x):
            h, w = x.shape[-2:]
            if self.kernel[0] >= h and self.kernel[1] >= w:
                return x.mean(dim=(-2, -1), keepdim=True)
            kh, kw = min(h, self.kernel[0]), min(w, self.kernel[1])
            out = F.avg_pool2d(x.double(), (kh, kw), stride=1).to(x.dtype)
            dh, dw = h - out.shape[-2], w - out.shape[-1]
            return F.pad(out, (dw // 2, dw - dw // 2, dh // 2, dh - dh // 2), mode='replicate')

    stages = [(level, s) for level, s in enumerate(net.encoders)] + [(len(net.encoders), net.middle_blks)]
    stages += [(len(net.encoders) - 1 - i, s) for i, s in enumerate(net.decoders)]
    for level, stage in stages:
        for block in stage:
            block.sca[0] = NaiveLocalPool(kernels[level])
    return net


def test_nafnet_local_kernels_follow_train_size():
    # train 32x32, 2 encoders (multiple 4): level-l map 32/2**l, window 1.5x that: 48, 24, 12.
    net = NAFNetLocal(**TINY_NAFNET, train_size=(1, 3, 32, 32))
    got = {(lvl, blk.sca[0].kernel_size) for lvl, stage in [(0, net.encoders[0]), (1, net.encoders[1]),
                                                              (2, net.middle_blks), (1, net.decoders[0]),
                                                              (0, net.decoders[1])] for blk in stage}
    assert got == {(0, (48, 48)), (1, (24, 24)), (2, (12, 12))}
    # A train size that needs padding: 30x21 -> 32x24 maps; windows (32>>l)*45//30, (24>>l)*31//21.
    net = NAFNetLocal(**TINY_NAFNET, train_size=(1, 3, 30, 21))
    assert [s[0].sca[0].kernel_size for s in (net.encoders[0], net.encoders[1], net.middle_blks)] == [
        (48, 35), (24, 17), (12, 8)]
    assert not net.training  # the official constructor leaves it in eval mode
    assert not list(net.buffers())


@pytest.mark.parametrize('size', [(48, 48), (37, 45), (20, 48), (9, 13)])
def test_nafnet_local_equals_nafnet_when_padded_input_fits_the_tlc_window(size):
    """Official TLC falls back to global pooling when the window covers every feature map, i.e. for padded
    inputs no larger than base_size = 1.5 x train size (48x48 here) -- in eval and in train mode."""
    plain = randomize_(NAFNet(**TINY_NAFNET))
    local = NAFNetLocal(**TINY_NAFNET, train_size=(1, 3, 32, 32))
    local.load_state_dict(plain.state_dict(), strict=True)
    x = torch.rand(2, 3, *size)
    with torch.no_grad():
        expected = plain.eval()(x)
        assert torch.allclose(local.eval()(x), expected, atol=1e-6)
        assert torch.allclose(local.train()(x), expected, atol=1e-6)


@pytest.mark.parametrize('size', [(64, 80), (52, 40), (100, 37)])
def test_nafnet_local_uses_local_pooling_on_larger_inputs(size):
    plain = randomize_(NAFNet(**TINY_NAFNET))
    local = NAFNetLocal(**TINY_NAFNET, train_size=(1, 3, 32, 32))
    local.load_state_dict(plain.state_dict(), strict=True)
    x = torch.rand(1, 3, *size)
    with torch.no_grad():
        got = local.eval()(x)
        assert (got - plain.eval()(x)).abs().max() > 2e-4  # TLC changes the result ...
        reference = naive_tlc_reference(plain, {0: (48, 48), 1: (24, 24), 2: (12, 12)})(x)
        assert (got - reference).abs().max() < 5e-6  # ... exactly as its definition says
        assert torch.equal(local.train()(x), got)  # the official TLC does not depend on the mode


def test_local_avg_pool_exact_on_large_offset_values():
    pool = LocalAvgPool2d((7, 5))
    x = torch.rand(2, 3, 40, 33) + 1000.0  # large DC value: integral images lose precision without centring
    out = pool(x)
    direct = F.avg_pool2d(x.double(), (7, 5), stride=1)
    assert out.shape == x.shape
    assert torch.allclose(out[:, :, 3:-3, 2:-2].double(), direct, atol=1e-4)
    assert torch.equal(out[:, :, :3, 2:-2], out[:, :, 3:4, 2:-2].expand(-1, -1, 3, -1))  # replicate border
    assert pool(torch.rand(1, 2, 7, 5)).shape == (1, 2, 1, 1)  # window covers the map: global pooling


def test_local_avg_pool_fast_variant_follows_the_official_approximation():
    """fast_imp: 2x2 windows of the stride-2 sub-sample (10 % 5 == 0 but max_reduction caps r at 2), the
    official integral-image indexing (first window starts at sub-sample row/col 1), nearest x2 up-sampling,
    replicate border."""
    pool = LocalAvgPool2d((4, 4), fast_imp=True, max_reduction=(2, 2))
    x = torch.rand(1, 2, 10, 10)
    sub = x[:, :, ::2, ::2]  # 5 x 5
    means = F.avg_pool2d(sub[:, :, 1:, 1:], 2, stride=1)  # 3 x 3
    expected = F.pad(means.repeat_interleave(2, -1).repeat_interleave(2, -2), (2, 2, 2, 2), mode='replicate')
    assert torch.allclose(pool(x), expected, atol=1e-6)
    const = torch.full((1, 2, 40, 35), 0.75)
    assert torch.allclose(LocalAvgPool2d((12, 12), fast_imp=True)(const), const, atol=1e-6)


def test_nafnet_local_fast_imp_builds_and_runs():
    net = randomize_(NAFNetLocal(**TINY_NAFNET, train_size=(1, 3, 32, 32), fast_imp=True))
    with torch.no_grad():
        assert net(torch.rand(1, 3, 70, 50)).shape == (1, 3, 70, 50)


# ----------------------------------------------------------------------------------------------
# PromptIR specifics
# ----------------------------------------------------------------------------------------------


def test_promptir_decoder_false_builds_but_forward_explains_the_official_crash():
    net = PromptIR(num_blocks=[1, 1, 1, 1], num_refinement_blocks=1)
    assert not net.decoder and not hasattr(net, 'prompt1')
    with pytest.raises(RuntimeError, match=r'PromptIR\(decoder=False\) cannot run forward.*decoder: true'):
        net(torch.rand(1, 3, 16, 16))
    small = PromptIR(dim=16, num_blocks=[1, 1, 1, 1], num_refinement_blocks=1, decoder=True)
    with pytest.raises(RuntimeError, match=r'hard-coded for dim=48'):
        small(torch.rand(1, 3, 16, 16))


def test_promptir_unused_modules_are_frozen_and_everything_else_gets_gradients():
    net = PromptIR(num_blocks=[1, 1, 1, 1], num_refinement_blocks=1, decoder=True)
    unused = set(net.unused_module_names())
    with pytest.raises(ValueError, match=r'PromptIR needs H and W divisible by 8, got 20x24'):
        net(torch.rand(1, 3, 20, 24))
    net(torch.rand(2, 3, 16, 24)).square().mean().backward()
    for name, p in net.named_parameters():
        if name.split('.')[0] in unused:
            assert not p.requires_grad and p.grad is None, name
        else:
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_prompt_gen_block_mixes_components_by_softmax_weights():
    block = PromptIR(num_blocks=[1, 1, 1, 1], num_refinement_blocks=1, decoder=True).prompt1
    x = torch.rand(2, 96, 8, 12)
    with torch.no_grad():
        weights = torch.softmax(block.linear_layer(x.mean(dim=(2, 3))), dim=1)
        mixed = torch.stack([sum(weights[b, i] * block.prompt_param[0, i] for i in range(5)) for b in range(2)])
        expected = block.conv3x3(F.interpolate(mixed, size=(8, 12), mode='bilinear', align_corners=False))
        assert torch.allclose(block(x), expected, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Shared functional pieces
# ----------------------------------------------------------------------------------------------


def test_channel_layer_norm_variants():
    x = torch.randn(2, 6, 5, 7) * 3 + 1
    w, b = torch.randn(6), torch.randn(6)
    ref = F.layer_norm(x.permute(0, 2, 3, 1), (6, ), w, b, eps=1e-5).permute(0, 3, 1, 2)
    assert torch.allclose(arch_util.channel_layer_norm(x, w, b), ref, atol=1e-5)
    bias_free = x / torch.sqrt(x.var(1, keepdim=True, unbiased=False) + 1e-5) * w.view(1, 6, 1, 1)
    assert torch.allclose(arch_util.channel_layer_norm(x, w), bias_free, atol=1e-5)
    norm = arch_util.ChannelLayerNorm(6, 'BiasFree')
    assert list(norm.state_dict()) == ['body.weight']
    assert list(arch_util.ChannelLayerNorm(6, 'WithBias').state_dict()) == ['body.weight', 'body.bias']
    with pytest.raises(ValueError, match="LayerNorm_type must be one of"):
        arch_util.ChannelLayerNorm(6, 'Bias')


def test_layer_norm2d_gradient_equals_official_hand_written_backward():
    torch.manual_seed(0)
    norm = arch_util.LayerNorm2d(4)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    x = torch.randn(2, 4, 3, 5, requires_grad=True)
    grad_out = torch.randn(2, 4, 3, 5)
    norm(x).backward(grad_out)
    # Official LayerNormFunction.backward (NAFNet arch_util), written out.
    xd = x.detach()
    var = (xd - xd.mean(1, keepdim=True)).pow(2).mean(1, keepdim=True)
    y = (xd - xd.mean(1, keepdim=True)) / (var + 1e-6).sqrt()
    g = grad_out * norm.weight.view(1, 4, 1, 1)
    gx = (g - y * (g * y).mean(1, keepdim=True) - g.mean(1, keepdim=True)) / torch.sqrt(var + 1e-6)
    assert torch.allclose(x.grad, gx, atol=1e-5)
    assert torch.allclose(norm.weight.grad, (grad_out * y).sum(dim=(0, 2, 3)), atol=1e-5)
    assert torch.allclose(norm.bias.grad, grad_out.sum(dim=(0, 2, 3)), atol=1e-5)


def test_transposed_attention_matches_per_head_loop():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 6, 4, 5) for _ in range(3))
    temperature = torch.tensor([0.5, 2.0]).view(2, 1, 1)
    out = arch_util.transposed_attention(q, k, v, 2, temperature)
    for b in range(2):
        for head in range(2):
            sl = slice(3 * head, 3 * head + 3)
            qh, kh, vh = (t[b, sl].reshape(3, -1) for t in (q, k, v))
            qh, kh = qh / qh.norm(dim=1, keepdim=True), kh / kh.norm(dim=1, keepdim=True)
            expected = torch.softmax(qh @ kh.T * temperature[head], dim=1) @ vh
            assert torch.allclose(out[b, sl].reshape(3, -1), expected, atol=1e-5)
    with pytest.raises(ValueError, match='6 channels cannot be split into 4 heads'):
        arch_util.transposed_attention(q, k, v, 4, torch.ones(4, 1, 1))


def test_gates():
    x = torch.randn(1, 4, 2, 2)
    assert torch.equal(arch_util.simple_gate(x), x[:, :2] * x[:, 2:])
    assert torch.equal(arch_util.SimpleGate()(x), x[:, :2] * x[:, 2:])
    assert torch.allclose(arch_util.gelu_gate(x), F.gelu(x[:, :2]) * x[:, 2:])


def test_pad_to_multiple():
    x = torch.arange(2 * 3 * 5 * 6, dtype=torch.float32).view(2, 3, 5, 6)
    same, size = arch_util.pad_to_multiple(x, 1)
    assert same is x and size == (5, 6)
    padded, size = arch_util.pad_to_multiple(x, 4, mode='reflect')
    assert padded.shape == (2, 3, 8, 8) and size == (5, 6)
    assert torch.equal(padded[..., :5, :6], x)
    assert torch.equal(padded[..., 5, :6], x[..., 3, :])  # reflect: row 5 mirrors row 3
    padded, _ = arch_util.pad_to_multiple(x, 4, mode='replicate')
    assert torch.equal(padded[..., 7, :6], x[..., 4, :])
    padded, _ = arch_util.pad_to_multiple(x, 4, mode='constant')
    assert padded[..., 5:, :].abs().sum() == 0 and padded[..., :, 6:].abs().sum() == 0
    tiny, _ = arch_util.pad_to_multiple(torch.rand(1, 1, 3, 3), 8)  # reflect impossible -> replicate
    assert tiny.shape == (1, 1, 8, 8) and torch.equal(tiny[..., 7, :3], tiny[..., 2, :3])
    with pytest.raises(ValueError, match="mode must be one of"):
        arch_util.pad_to_multiple(x, 8, mode='circular')
