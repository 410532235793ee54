"""Stage 1: the quality perceiver (frozen CLIP + learned prompts) on the tiny random CLIP config."""
import open_clip
import pytest
import torch
import torch.nn.functional as F

from basicsr.utils.registry import ARCH_REGISTRY
from perceive_ir_plugin.archs.clip_util import (TINY_CLIP_MODEL, build_frozen_clip, read_torchscript_tensors,
                                                register_plugin_clip_configs)
from perceive_ir_plugin.archs.quality_perceiver_arch import QualityPerceiver
from perceive_ir_plugin.utils.checkpoint import CheckpointError

TINY = TINY_CLIP_MODEL


@pytest.fixture(scope='module')
def perceiver():
    torch.manual_seed(0)
    return QualityPerceiver(clip_model=TINY)


def _other_tiny_clip(seed):
    register_plugin_clip_configs()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return open_clip.create_model(TINY, pretrained=None).eval()


def test_registered_and_built_from_options():
    net = ARCH_REGISTRY.get('QualityPerceiver')(clip_model=TINY, n_ctx=4)
    assert isinstance(net, QualityPerceiver)
    assert net.prompt_learner.context.shape == (3, 4, 64)


def test_prompt_learner_shapes_and_initialisation(perceiver):
    learner = perceiver.prompt_learner
    width = perceiver.clip.token_embedding.weight.shape[1]
    assert learner.context.shape == (3, 16, width)
    assert learner.token_prefix.shape == (3, 1, width)
    assert learner.token_suffix.shape == (3, 77 - 1 - 16, width)
    assert learner.tokenized_prompts.shape == (3, 77)
    assert learner.tokenized_prompts.argmax(-1).tolist() == [17, 17, 17]
    assert learner().shape == (3, 77, width)
    emb = perceiver.clip.token_embedding.weight
    tokenizer = open_clip.get_tokenizer(TINY)
    for c, name in enumerate(('terrible', 'mediocre', 'excellent')):
        (token_id, ) = tokenizer.encode(name)
        assert torch.equal(learner.context[c, -1], emb[token_id])
    sot, eot = tokenizer.sot_token_id, tokenizer.eot_token_id
    assert torch.equal(learner.token_prefix[:, 0], emb[sot].expand(3, -1))
    assert torch.equal(learner.token_suffix[:, 0], emb[eot].expand(3, -1))
    assert torch.equal(learner.token_suffix[:, 1], emb[0].expand(3, -1))  # padding token
    rest = learner.context[:, :-1]
    assert abs(rest.mean().item()) < 0.002
    assert abs(rest.std().item() - 0.02) < 0.0015


def test_text_path_equals_clip_encode_text(perceiver):
    # With the context set to the token embeddings of "X ... X <class>", the prompt path must
    # reproduce CLIP's own encode_text of that sentence.
    tokenizer = open_clip.get_tokenizer(TINY)
    ids = tokenizer([' '.join(['X'] * 15 + [name]) for name in perceiver.class_names])
    net = QualityPerceiver(clip_model=TINY)
    with torch.no_grad():
        net.prompt_learner.context.copy_(net.clip.token_embedding(ids)[:, 1:17])
        expected = F.normalize(net.clip.encode_text(ids), dim=-1)
        assert torch.allclose(net.get_text_features(), expected, atol=1e-6)


def test_logits_probabilities_and_score(perceiver):
    torch.manual_seed(1)
    img = torch.rand(2, 3, 40, 56)
    with torch.no_grad():
        cos = perceiver.cosine(img)
        logits = perceiver(img)
        assert logits.shape == (2, 3)
        assert torch.allclose(logits, perceiver.clip.logit_scale.exp() * cos)
        assert torch.allclose(perceiver.probabilities(img), torch.softmax(cos, -1))
        assert torch.allclose(perceiver.probabilities(img, logit_scale='clip'), torch.softmax(logits, -1))
        assert torch.allclose(perceiver.probabilities(img, logit_scale=7.0), torch.softmax(7 * cos, -1))
        probs = torch.softmax(logits, -1)
        assert torch.allclose(perceiver.quality_score(img), probs[:, 1] * 0.5 + probs[:, 2])
    with pytest.raises(ValueError, match='logit_scale'):
        perceiver.probabilities(img, logit_scale='auto')
    with pytest.raises(ValueError, match=r'\(B, 3, H, W\)'):
        perceiver(torch.rand(3, 40, 40))


def test_only_context_receives_gradients():
    net = QualityPerceiver(clip_model=TINY, n_ctx=4)
    net.train()
    assert not net.clip.training  # CLIP stays in eval mode
    assert [n for n, p in net.named_parameters() if p.requires_grad] == ['prompt_learner.context']
    img = torch.rand(3, 3, 32, 32, requires_grad=True)
    loss = F.cross_entropy(net(img), torch.tensor([0, 1, 2]))
    loss.backward()
    assert net.prompt_learner.context.grad is not None and net.prompt_learner.context.grad.abs().sum() > 0
    assert all(p.grad is None for n, p in net.named_parameters() if n != 'prompt_learner.context')
    assert img.grad is not None and img.grad.abs().sum() > 0  # stage 2 needs the image gradient


def test_freeze_caches_text_features():
    net = QualityPerceiver(clip_model=TINY, n_ctx=4)
    assert not net.is_frozen
    net.freeze()
    assert net.is_frozen and not net.prompt_learner.context.requires_grad
    assert net.text_features.shape == (3, 64)
    assert torch.allclose(net.text_features.norm(dim=-1), torch.ones(3))
    with torch.no_grad():
        net.prompt_learner.context.add_(1.0)  # a cached perceiver ignores later edits ...
    assert not torch.allclose(net.get_text_features(), net._compute_text_features())
    net.unfreeze()  # ... until unfrozen
    assert net.text_features is None and net.prompt_learner.context.requires_grad
    assert 'text_features' not in net.state_dict()


def test_prompts_save_load_round_trip(tmp_path):
    torch.manual_seed(3)
    net = QualityPerceiver(clip_model=TINY)
    with torch.no_grad():
        net.prompt_learner.context.add_(0.05 * torch.randn_like(net.prompt_learner.context))
    path = tmp_path / 'prompts' / 'quality_prompts_7.pth'
    net.save_prompts(str(path), iteration=7, task_balanced=True)
    raw = torch.load(path, weights_only=True)
    assert raw['quality_names'] == ['terrible', 'mediocre', 'excellent'] and raw['iteration'] == 7
    assert set(raw['prompt_learner']) == {'context', 'token_prefix', 'token_suffix', 'tokenized_prompts'}
    assert path.stat().st_size < 200_000  # the prompts file does not carry CLIP

    loaded = QualityPerceiver(clip_model=TINY, prompt_weights=str(path))
    assert loaded.is_frozen and loaded.prompt_meta['iteration'] == 7
    img = torch.rand(2, 3, 48, 48)
    net.freeze()
    with torch.no_grad():
        assert torch.equal(loaded(img), net(img))


def test_prompts_from_another_clip_or_classes_are_refused(tmp_path):
    path = tmp_path / 'p.pth'
    QualityPerceiver(clip_model=TINY).save_prompts(str(path))
    weights = tmp_path / 'other_clip.pt'
    torch.save(_other_tiny_clip(11).state_dict(), weights)
    with pytest.raises(CheckpointError, match='different CLIP'):
        QualityPerceiver(clip_model=TINY, clip_weights=str(weights), prompt_weights=str(path))
    with pytest.raises(CheckpointError, match=r'shape \(3, 16, 64\).*expects \(3, 8, 64\)'):
        QualityPerceiver(clip_model=TINY, n_ctx=8, prompt_weights=str(path))
    with pytest.raises(ValueError, match='trained for classes'):
        QualityPerceiver(clip_model=TINY, class_names=('bad', 'good', 'excellent'), prompt_weights=str(path))
    with pytest.raises(FileNotFoundError, match="option 'prompt_weights'"):
        QualityPerceiver(clip_model=TINY, prompt_weights=str(tmp_path / 'missing.pth'))


def test_class_names_must_be_single_tokens():
    with pytest.raises(ValueError, match="'supercalifragilistic' is .* tokens"):
        QualityPerceiver(clip_model=TINY, class_names=('terrible', 'supercalifragilistic', 'excellent'))


def test_missing_or_wrong_clip_weights_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"Option 'clip_weights' is not set.*ViT-B-32\.pt"):
        QualityPerceiver()  # default ViT-B-32-quickgelu needs local weights
    missing = tmp_path / 'ViT-B-32.pt'
    with pytest.raises(FileNotFoundError, match=rf"not found: '{missing}' \(option 'clip_weights'\)"):
        QualityPerceiver(clip_weights=str(missing))
    garbage = tmp_path / 'garbage.pt'
    garbage.write_bytes(b'this is not a checkpoint')
    with pytest.raises(CheckpointError, match="option 'clip_weights'"):
        QualityPerceiver(clip_model=TINY, clip_weights=str(garbage))
    sd = _other_tiny_clip(1).state_dict()
    sd['visual.proj'] = torch.zeros(64, 32)
    del sd['ln_final.weight']
    wrong = tmp_path / 'wrong.pt'
    torch.save(sd, wrong)
    with pytest.raises(CheckpointError, match=r"(?s)do not fit the open_clip model 'perceive-ir-tiny-clip'.*"
                                              r'missing key\(s\): ln_final.weight.*visual.proj'):
        QualityPerceiver(clip_model=TINY, clip_weights=str(wrong))
    with pytest.raises(ValueError, match="'clip_model': 'ViT-Q-99' is not an open_clip model config"):
        QualityPerceiver(clip_model='ViT-Q-99', clip_weights=str(wrong))


def test_open_clip_state_dict_loads_into_tiny_config(tmp_path):
    source = _other_tiny_clip(5)
    sd = source.state_dict()
    path = tmp_path / 'open_clip_ckpt.pt'
    # open_clip training checkpoint layout: {'epoch', 'state_dict': {'module.<key>': ...}}
    torch.save({'epoch': 3, 'name': 'tiny', 'state_dict': {f'module.{k}': v for k, v in sd.items()}}, path)
    clip = build_frozen_clip(TINY, str(path))
    assert all(torch.equal(clip.state_dict()[k], v) for k, v in sd.items())
    assert not any(p.requires_grad for p in clip.parameters())
    img = torch.rand(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(clip.encode_image(img), source.encode_image(img))


@pytest.mark.filterwarnings('ignore::torch.jit.TracerWarning', 'ignore::FutureWarning')
def test_torchscript_archive_is_read_without_running_code(tmp_path):
    # OpenAI's ViT-B-32.pt is a TorchScript archive with the same parameter names; a traced
    # (half-precision, like OpenAI's) tiny CLIP has the same layout.
    source = _other_tiny_clip(9)
    traced = torch.jit.trace_module(source.half(), {'encode_text': (torch.zeros(1, 77, dtype=torch.long), )},
                                    check_trace=False)
    path = tmp_path / 'tiny-openai-style.pt'
    traced.save(str(path))
    tensors = read_torchscript_tensors(str(path))
    sd = source.state_dict()
    assert set(sd) <= set(tensors)
    assert all(tensors[k].dtype == torch.float16 and torch.equal(tensors[k], sd[k]) for k in sd)
    net = QualityPerceiver(clip_model=TINY, clip_weights=str(path))
    assert net.clip.visual.proj.dtype == torch.float32
    assert torch.equal(net.clip.visual.proj, sd['visual.proj'].float())
