"""Stage-2 networks: PerceiveIRNet, the backbone wrapper, DINOv2 SGM weight layouts, CFE."""
import pytest
import torch
from safetensors.torch import save_file

from basicsr.archs import build_network
from perceive_ir_plugin.archs.perceiveir_arch import PerceiveIRNet, count_trainable_parameters
from perceive_ir_plugin.archs.semantic_guidance import (DINOv2SemanticEncoder, timm_to_hf_dinov2,
                                                        timm_to_original_dinov2)
from perceive_ir_plugin.utils.checkpoint import CheckpointError


# Tiny tensors: one intra-op thread is faster, and much faster on a loaded machine.
pytestmark = pytest.mark.usefixtures('one_torch_thread')


# Trainable parameters of PerceiveIRNet's default (release) configuration, counted by
# building it (frozen DINOv2 excluded). SPEC §7 tallies ≈33.9 M from the release's layers.
DEFAULT_TRAINABLE_PARAMS = 33_901_111

TINY_NET = dict(type='PerceiveIRNet', dim=8, num_blocks=[1, 1, 1, 1], num_refinement_blocks=1, heads=[1, 1, 2, 2],
                sgm_config='tiny', sgm_allow_random=True, cfe_dim=8, cfe_channels=[4, 4, 8, 8])


def test_default_perceiveirnet_param_count_and_release_names():
    with torch.device('meta'):
        net = PerceiveIRNet(sgm_allow_random=True)
    assert count_trainable_parameters(net) == DEFAULT_TRAINABLE_PARAMS
    assert DEFAULT_TRAINABLE_PARAMS == pytest.approx(33.9e6, rel=2e-3)
    keys = net.state_dict().keys()
    tops = {k.split('.')[0] for k in keys}
    assert tops == {'embed', 'encoder1', 'encoder2', 'encoder3', 'down1', 'down2', 'down3', 'cfe', 'pgm', 'latent',
                    'up3', 'up2', 'up1', 'reduce3', 'reduce2', 'reduce1', 'decoder3', 'decoder2', 'decoder1',
                    'refinement', 'output'}
    shapes = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    assert shapes['pgm.0.affine.0.weight'] == (96, 768 + 128)  # level 1: 48 channels -> 2C
    assert shapes['pgm.3.affine.2.weight'] == (768, 768)  # latent: 384 channels
    assert shapes['cfe.projection.weight'] == (128, 128)
    for name in ('latent.blocks.7.attention.q.1.weight', 'latent.blocks.0.attention.kv.0.weight',
                 'decoder1.blocks.3.mdta.qkv_dw.weight', 'decoder3.blocks.5.guidance_norm.body.bias',
                 'decoder2.blocks.0.mdta_norm.body.weight', 'encoder1.0.attention.qkv_dw.weight',
                 'refinement.3.ffn.depthwise.bias', 'reduce1.weight', 'output.bias'):
        assert name in shapes, name
    assert shapes['latent.blocks.0.ffn.project_in.weight'] == (2 * int(384 * 2.66), 384, 1, 1)


def test_tiny_perceiveirnet_forward_gradients_and_frozen_sgm():
    torch.manual_seed(0)
    net = build_network(dict(TINY_NET))
    x = torch.rand(2, 3, 16, 16)
    out, aux = net(x, x_pos=torch.rand(2, 3, 24, 24), return_aux=True)
    assert out.shape == x.shape and aux['z'].shape == (2, 8) and aux['z_pos'].shape == (2, 8)
    assert torch.allclose(aux['z'].norm(dim=1), torch.ones(2), atol=1e-5)
    (out.mean() + aux['z_pos'].sum()).backward()
    trainable = dict(net.named_parameters())
    assert all(p.grad is not None for p in trainable.values()), [n for n, p in trainable.items() if p.grad is None]
    dino = net.semantic_encoder
    assert not any(p.requires_grad or p.grad is not None for p in dino.parameters())
    assert not any(k.startswith(('sgm', 'vit')) for k in net.state_dict())
    assert len(list(net.parameters())) == len(trainable) and not any(p is q for p in net.parameters()
                                                                     for q in dino.parameters())
    net.train()
    assert not dino.training
    net.to(torch.float64)  # moves follow the network, the encoder stays out of the state dict
    assert next(dino.parameters()).dtype == torch.float64
    with pytest.raises(ValueError, match='divisible by 8'):
        net(torch.rand(1, 3, 30, 32, dtype=torch.float64))


@pytest.mark.parametrize('modes', [dict(etb_mode='figure'), dict(pgm_mode='figure'), dict(cfe_mode='figure')])
def test_figure_variants_build_and_run(modes):
    net = build_network(dict(TINY_NET, **modes))
    out = net(torch.rand(1, 3, 16, 16))
    assert out.shape == (1, 3, 16, 16) and torch.isfinite(out).all()
    keys = net.state_dict().keys()
    if 'etb_mode' in modes:
        assert not any('.mdta.' in k for k in keys)
    if 'pgm_mode' in modes:
        assert 'pgm.0.gamma.0.weight' in keys and 'pgm.0.beta.2.weight' in keys


# ------------------------------------------------------------------------------ wrapper
BACKBONES = {
    'Restormer': dict(type='Restormer', dim=8, num_blocks=[1, 1, 1, 1], num_refinement_blocks=1, heads=[1, 1, 2, 2]),
    'NAFNet': dict(type='NAFNet', width=8, middle_blk_num=1, enc_blk_nums=[1, 1, 1, 1], dec_blk_nums=[1, 1, 1, 1]),
    'PromptIR': dict(type='PromptIR', dim=48, num_blocks=[1, 1, 1, 1], num_refinement_blocks=1, heads=[1, 2, 4, 8],
                     decoder=True),
}
WRAP = dict(type='PerceiveIRWrapper', sgm_config='tiny', sgm_allow_random=True, cfe_dim=8, cfe_channels=[4, 4, 8, 8])


@pytest.mark.parametrize('name', sorted(BACKBONES))
def test_wrapper_equals_bare_backbone_at_step_zero(name, tmp_path):
    torch.manual_seed(1)
    bare = build_network(dict(BACKBONES[name])).eval()
    wrapper = build_network(dict(WRAP, backbone=dict(BACKBONES[name]))).eval()
    # Retrofit the bare backbone's weights the way users do: an official-style checkpoint.
    ckpt = tmp_path / 'official.ckpt'
    if name == 'PromptIR':  # Lightning layout: state_dict with a 'net.' prefix
        torch.save({'state_dict': {f'net.{k}': v for k, v in bare.state_dict().items()}, 'epoch': 3}, ckpt)
    else:
        torch.save({'params': bare.state_dict()}, ckpt)
    wrapper.load_backbone(str(ckpt))
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        expected = bare(x)
        got = wrapper(x)
    assert torch.equal(got, expected)
    # The hooks really act: a non-zero FiLM changes the output, gradients reach PGM and CFE.
    with torch.no_grad():
        for pgm in wrapper.pgm:
            pgm.affine[2].bias.normal_(0, 0.1)
    wrapper.train()
    out, aux = wrapper(x, x_pos=x[:, :, :8, :8], return_aux=True)
    assert not torch.allclose(out, expected, atol=1e-4)
    out.mean().backward()
    assert all(p.grad is not None for p in wrapper.pgm.parameters())
    assert all(p.grad is not None for p in wrapper.cfe.parameters())
    assert not any(p.grad is not None for p in wrapper.semantic_encoder.parameters())
    assert {k.split('.')[0] for k in wrapper.state_dict()} == {'backbone', 'cfe', 'pgm'}
    # Called on its own, the wrapped backbone is untouched by the hooks.
    with torch.no_grad():
        assert torch.equal(wrapper.backbone.eval()(x), expected)


def test_wrapper_level_table_and_errors():
    nafnet = build_network(dict(WRAP, backbone=dict(BACKBONES['NAFNet'])))
    assert nafnet.levels == [('decoders.3', 8), ('decoders.2', 16), ('decoders.1', 32), ('decoders.0', 64),
                             ('middle_blks', 128)]
    assert nafnet.semantic_encoder.layers == (1, 4, 6, 8, 12)
    with pytest.raises(ValueError, match="no module 'decoder9'"):
        build_network(dict(WRAP, backbone=dict(BACKBONES['Restormer']), levels=[['decoder9', 8]], sgm_layers=[1]))
    with pytest.raises(ValueError, match="'backbone' must be a dict"):
        build_network(dict(WRAP))
    with pytest.raises(ValueError, match='sgm_layers has 2 entries'):
        build_network(dict(WRAP, backbone=dict(BACKBONES['Restormer']), sgm_layers=[1, 2]))


# ------------------------------------------------------------------------------ DINOv2 weights
def _manual_cls(encoder, x, layer):
    vit = encoder.vit
    h = torch.nn.functional.interpolate(x, size=(encoder.img_size, ) * 2, mode='bicubic', align_corners=False)
    h = (h - encoder.mean) / encoder.std
    h = vit._pos_embed(vit.patch_embed(h))
    for block in vit.blocks[:layer]:
        h = block(h)
    return h[:, 0]


def test_dinov2_layout_round_trips(tmp_path):
    torch.manual_seed(2)
    source = DINOv2SemanticEncoder('tiny', allow_random=True)
    timm_sd = source.vit.state_dict()
    hf = timm_to_hf_dinov2(timm_sd)
    assert 'encoder.layer.0.attention.attention.query.weight' in hf and 'embeddings.position_embeddings' in hf
    assert 'encoder.layer.11.layer_scale2.lambda1' in hf and 'layernorm.weight' in hf
    save_file({k: v.contiguous() for k, v in hf.items()}, str(tmp_path / 'model.safetensors'))
    hf_dir = tmp_path / 'dinov2-base'
    hf_dir.mkdir()
    torch.save({f'dinov2.{k}': v for k, v in hf.items()}, hf_dir / 'pytorch_model.bin')
    original = timm_to_original_dinov2(timm_sd)
    torch.save(original, tmp_path / 'dinov2_vitb14_pretrain.pth')
    # chunked FSDP layout of the original repository: blocks.<chunk>.<index>.*
    chunked = {(k.replace('blocks.', f'blocks.{int(k.split(".")[1]) // 4}.', 1) if k.startswith('blocks.') else k): v
               for k, v in original.items()}
    torch.save(chunked, tmp_path / 'chunked.pth')
    x = torch.rand(2, 3, 37, 41)
    reference = source(x)
    for path in ('model.safetensors', 'dinov2-base', 'dinov2_vitb14_pretrain.pth', 'chunked.pth'):
        loaded = DINOv2SemanticEncoder('tiny', weights=str(tmp_path / path))
        for k, v in loaded.vit.state_dict().items():
            assert torch.equal(v, timm_sd[k]), (path, k)
        assert all(torch.equal(a, b) for a, b in zip(loaded(x), reference))
    # CLS tokens are those after layers 1/4/8/12, before the final norm.
    for layer, cls in zip((1, 4, 8, 12), reference):
        assert torch.allclose(cls, _manual_cls(source, x, layer), atol=1e-6)


def test_dinov2_position_grid_is_resampled(tmp_path):
    from timm.layers import resample_abs_pos_embed
    torch.manual_seed(3)
    bigger = DINOv2SemanticEncoder(dict(img_size=56, patch_size=14, embed_dim=16, depth=12, num_heads=2),
                                   allow_random=True)
    torch.save(timm_to_original_dinov2(bigger.vit.state_dict()), tmp_path / 'grid4.pth')
    small = DINOv2SemanticEncoder('tiny', weights=str(tmp_path / 'grid4.pth'))
    expected = resample_abs_pos_embed(bigger.vit.pos_embed.detach(), new_size=[2, 2], num_prefix_tokens=1,
                                      interpolation='bicubic', antialias=True)
    assert torch.allclose(small.vit.pos_embed, expected)
    assert torch.equal(small.vit.pos_embed[:, 0], bigger.vit.pos_embed[:, 0])  # CLS position kept


def test_dinov2_weight_errors(tmp_path):
    with pytest.raises(ValueError, match="'sgm_weights' is required"):
        DINOv2SemanticEncoder('tiny')
    with pytest.raises(FileNotFoundError, match='sgm_weights'):
        DINOv2SemanticEncoder('tiny', weights=str(tmp_path / 'nope.pth'))
    torch.save({'conv.weight': torch.zeros(1)}, tmp_path / 'other.pth')
    with pytest.raises(CheckpointError, match='not a DINOv2 checkpoint'):
        DINOv2SemanticEncoder('tiny', weights=str(tmp_path / 'other.pth'))
    torch.save(timm_to_original_dinov2(DINOv2SemanticEncoder('tiny', allow_random=True).vit.state_dict()),
               tmp_path / 'tiny.pth')
    with pytest.raises(CheckpointError, match='does not fit'):
        DINOv2SemanticEncoder(dict(img_size=28, patch_size=14, embed_dim=32, depth=12, num_heads=2),
                              weights=str(tmp_path / 'tiny.pth'))
    empty = tmp_path / 'empty_hf'
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match='model.safetensors'):
        DINOv2SemanticEncoder('tiny', weights=str(empty))
