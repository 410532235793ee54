"""Stage-2 losses against hand-computed values: L_cl, L_dpl (+ its VGG taps), L_clip."""
import math

import pytest
import torch
import torchvision
from torch import nn

from basicsr.losses import build_loss
from perceive_ir_plugin.losses.degradation_contrastive_loss import DegradationContrastiveLoss
from perceive_ir_plugin.losses.dpl_loss import DifficultyAdaptivePerceptualLoss, VGG16Features
from perceive_ir_plugin.losses.quality_clip_loss import QualityCLIPLoss
from perceive_ir_plugin.utils.checkpoint import CheckpointError


# Tiny tensors: one intra-op thread is faster, and much faster on a loaded machine.
pytestmark = pytest.mark.usefixtures('one_torch_thread')


# ---------------------------------------------------------------- L_cl
A = [[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]]
P = [[0.8, 0.6], [0.0, 1.0], [1.0, 0.0]]
TASKS = [0, 1, 1]


def _lse(*xs):
    return math.log(sum(math.exp(x) for x in xs))


# By hand, τ = 0.1: anchor 0 (task 0): pos a0·p0 = 0.8, negatives a1·a0 = 0, a2·a0 = 0.6;
# anchor 1 (task 1): pos 1, negative a0·a1 = 0; anchor 2 (task 1): pos 0.6, negative a0·a2 = 0.6.
HAND_CL = [_lse(8, 0, 6) - 8, _lse(10, 0) - 10, _lse(6, 6) - 6]


def test_contrastive_loss_matches_hand_computation():
    loss = build_loss({'type': 'DegradationContrastiveLoss', 'loss_weight': 0.5, 'temperature': 0.1})
    a = torch.tensor(A, requires_grad=True)
    p = torch.tensor(P, requires_grad=True)
    value = loss(a, p, torch.tensor(TASKS))
    assert value.item() == pytest.approx(0.5 * sum(HAND_CL) / 3, rel=1e-5)
    value.backward()
    assert a.grad.abs().sum() > 0 and p.grad.abs().sum() > 0


def test_contrastive_loss_negatives_are_detached_and_inputs_renormalised():
    a = torch.tensor(A, requires_grad=True)
    loss = DegradationContrastiveLoss(temperature=0.1)
    # Scaling anchors/positives changes nothing (L2-normalised inside).
    scaled = loss(torch.tensor(A) * 3, torch.tensor(P) * 0.5, torch.tensor(TASKS))
    assert scaled.item() == pytest.approx(sum(HAND_CL) / 3, rel=1e-5)
    # Only anchor 0's loss: its gradient must not flow into the negatives a1, a2.
    value = loss(a, torch.tensor(P), torch.tensor(TASKS))
    grad_all = torch.autograd.grad(value, a)[0]
    consts = torch.tensor(A)
    manual = []
    for i in range(3):
        ai = a[i]
        negs = [consts[j] for j in range(3) if TASKS[j] != TASKS[i]]
        logits = torch.stack([ai @ torch.tensor(P[i])] + [ai @ n for n in negs]) / 0.1
        manual.append(torch.logsumexp(logits, 0) - logits[0])
    grad_manual = torch.autograd.grad(torch.stack(manual).mean(), a)[0]
    # a is unit-norm, so normalisation only projects the gradient: compare tangential parts.
    unit = torch.tensor(A)
    tangential = grad_manual - (grad_manual * unit).sum(1, keepdim=True) * unit
    assert torch.allclose(grad_all, tangential, atol=1e-5)


def test_contrastive_loss_without_cross_task_negatives_is_zero_and_attached():
    a = torch.tensor(A, requires_grad=True)
    value = DegradationContrastiveLoss()(a, torch.tensor(P), torch.tensor([2, 2, 2]))
    assert value.item() == 0.0 and value.requires_grad
    with pytest.raises(ValueError, match='task ids'):
        DegradationContrastiveLoss()(a, torch.tensor(P), torch.tensor([0, 1]))


class _FakeGroup:
    """Two-rank process group simulated in-process: this process is ``rank``, the other
    rank's tensors are given. ``all_gather`` fills the list in rank order like gloo/NCCL."""

    def __init__(self, rank, other):
        self.rank, self.other, self.calls = rank, list(other), 0

    def is_available(self):
        return True

    def is_initialized(self):
        return True

    def get_world_size(self):
        return 2

    def all_gather(self, out, tensor):
        theirs = self.other.pop(0)
        if theirs.dim() and theirs.shape[0] < tensor.shape[0]:  # the other rank pads to the longest batch
            pad = tensor.shape[0] - theirs.shape[0]
            theirs = torch.cat([theirs, theirs.new_zeros((pad, ) + tuple(theirs.shape[1:]))])
        mine = tensor
        out[self.rank].copy_(mine)
        out[1 - self.rank].copy_(theirs)


def _run_rank(monkeypatch, rank):
    import perceive_ir_plugin.losses.degradation_contrastive_loss as module
    idx = [0] if rank == 0 else [1, 2]
    other = [1, 2] if rank == 0 else [0]
    # what the other rank contributes to the three all_gathers: its size, its Z, its task ids
    fake = _FakeGroup(rank, [torch.tensor([len(other)]), torch.nn.functional.normalize(torch.tensor(
        [A[i] for i in other]), dim=1), torch.tensor([TASKS[i] for i in other])])
    monkeypatch.setattr(module, 'dist', fake)
    a = torch.tensor([A[i] for i in idx], requires_grad=True)
    value = DegradationContrastiveLoss(temperature=0.1)(a, torch.tensor([P[i] for i in idx]),
                                                         torch.tensor([TASKS[i] for i in idx]))
    value.backward()
    assert not fake.other  # sizes, embeddings and task ids were all exchanged
    return value.item(), a.grad


def test_contrastive_loss_gathers_negatives_across_ranks(monkeypatch):
    # Rank 0 holds anchor 0, rank 1 anchors 1 and 2: unequal per-rank batches (padding path).
    loss0, grad0 = _run_rank(monkeypatch, 0)
    loss1, grad1 = _run_rank(monkeypatch, 1)
    assert loss0 == pytest.approx(HAND_CL[0], rel=1e-5)
    assert loss1 == pytest.approx((HAND_CL[1] + HAND_CL[2]) / 2, rel=1e-5)
    # Local gradients: the gathered negatives are constants, only local anchors get gradient.
    a = torch.tensor(A, requires_grad=True)
    single = [torch.autograd.grad(_single_anchor_loss(a, i), a)[0][i] for i in range(3)]
    assert torch.allclose(grad0[0], single[0], atol=1e-5)
    assert torch.allclose(grad1, torch.stack(single[1:]) / 2, atol=1e-5)


def _single_anchor_loss(a, i):
    a_n = torch.nn.functional.normalize(a, dim=1)
    negs = [a_n[j].detach() for j in range(3) if TASKS[j] != TASKS[i]]
    logits = torch.stack([a_n[i] @ torch.tensor(P[i])] + [a_n[i] @ n for n in negs]) / 0.1
    return torch.logsumexp(logits, 0) - logits[0]


# ---------------------------------------------------------------- L_dpl
class _PixelTaps(nn.Module):
    """Stands in for VGG: the 'features' of every level are the pixels themselves."""

    def forward(self, x):
        return [x, x * 2, x, x]


def test_dpl_matches_hand_computation():
    loss = DifficultyAdaptivePerceptualLoss(loss_weight=0.1, allow_random_vgg=True)
    loss.vgg = _PixelTaps()
    out = torch.full((2, 1, 2, 2), 0.5, requires_grad=True)
    gt = torch.full((2, 1, 2, 2), 0.6)
    lq = torch.full((2, 1, 2, 2), 0.1)
    prox = torch.stack([torch.full((2, 1, 2, 2), 0.3), torch.full((2, 1, 2, 2), 0.9)], dim=1)
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    alpha = torch.tensor([[1.25, 0.75], [0.75, 1.25]])
    value = loss(out, gt, lq, prox, mask, alpha)
    # d(R,GT)=0.1, d(R,LQ)=0.4, d(R,P1)=0.2, d(R,P2)=0.4 (level 2 doubles every distance).
    # sample 0: ratio = 0.1 / (0.8 + 1.25*0.2 + 0.75*0.4) = 0.1/1.35 ; sample 1: 0.1 / (0.8 + 0.75*0.2) = 0.1/0.95
    w = [1 / 12, 1 / 6, 1 / 3, 1]
    per_level = [(0.1 / 1.35 + 0.1 / 0.95) / 2] * 4  # the doubling cancels in each ratio
    expected = 0.1 * sum(wi * li for wi, li in zip(w, per_level))
    assert value.item() == pytest.approx(expected, rel=1e-5)
    value.backward()
    assert out.grad is not None and out.grad.abs().sum() > 0


def test_dpl_clamps_denominator_and_alpha_rule():
    loss = DifficultyAdaptivePerceptualLoss(allow_random_vgg=True, layer_weights=(0, 0, 0, 1))
    loss.vgg = _PixelTaps()
    same = torch.full((1, 1, 2, 2), 0.5)
    value = loss(same, torch.full((1, 1, 2, 2), 0.5 + 1e-3), same.clone())  # d(R,LQ) = 0
    assert value.item() == pytest.approx(1e-3 / 1e-6, rel=1e-3)
    alpha = loss.difficulty_alpha(torch.tensor([[20.0, 30.0, 25.0]]), 25.0)
    assert alpha.tolist() == [[1.25, 0.75, 1.25]]  # PSNR <= reference is the hard case


def _torchvision_vgg_file(tmp_path):
    torch.manual_seed(0)
    full = torchvision.models.vgg.make_layers(torchvision.models.vgg.cfgs['D'])
    state = {f'features.{k}': v for k, v in full.state_dict().items() if int(k.split('.')[0]) < 16}
    state['features.17.weight'] = torch.zeros(1)  # later layers and the classifier are ignored
    state['classifier.0.weight'] = torch.zeros(1)
    path = tmp_path / 'vgg16-397923af.pth'
    torch.save(state, path)
    return path, full


def test_vgg_taps_reproduce_release_in_place_relu_features(tmp_path):
    path, full = _torchvision_vgg_file(tmp_path)
    ours = VGG16Features(str(path))
    assert not any(p.requires_grad for p in ours.parameters())
    x = torch.rand(1, 3, 20, 20)
    # The release taps modules 3, 7, 11, 15 of torchvision's in-place-ReLU features[:16].
    tv = full[:16].eval()
    taps = {}
    hooks = [tv[i].register_forward_hook(lambda m, inp, out, i=i: taps.__setitem__(i, out)) for i in (3, 7, 11, 15)]
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        tv((x - mean) / std)
        feats = ours(x)
    for h in hooks:
        h.remove()
    assert [f.shape[1] for f in feats] == [64, 128, 256, 256]
    for f, i in zip(feats, (3, 7, 11, 15)):
        assert torch.allclose(f, taps[i], atol=1e-5)
    assert (taps[7] >= 0).all()  # index 7 really holds relu2_2 (the in-place subtlety)


def test_vgg_weights_are_required_and_checked(tmp_path):
    with pytest.raises(ValueError, match="'vgg_weights' is required"):
        DifficultyAdaptivePerceptualLoss()
    bad = tmp_path / 'bad.pth'
    torch.save({'features.0.weight': torch.zeros(3)}, bad)
    with pytest.raises(CheckpointError, match='vgg_weights'):
        DifficultyAdaptivePerceptualLoss(vgg_weights=str(bad))
    with pytest.raises(FileNotFoundError, match='vgg_weights'):
        DifficultyAdaptivePerceptualLoss(vgg_weights=str(tmp_path / 'missing.pth'))


def test_dpl_gives_no_gradient_to_vgg(tmp_path):
    path, _ = _torchvision_vgg_file(tmp_path)
    loss = DifficultyAdaptivePerceptualLoss(vgg_weights=str(path))
    out = torch.rand(1, 3, 16, 16, requires_grad=True)
    loss(out, torch.rand(1, 3, 16, 16), torch.rand(1, 3, 16, 16), [torch.rand(1, 3, 16, 16)]).backward()
    assert out.grad.abs().sum() > 0
    assert all(p.grad is None for p in loss.parameters())


# ---------------------------------------------------------------- L_clip
class _StubPerceiver(nn.Module):
    """p = softmax(s · [0, 0, mean(img)]) with s = 1 when no logit scale is given."""
    class_names = ('terrible', 'mediocre', 'excellent')

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(1))
        self.frozen = False

    def freeze(self):
        self.frozen = True

    def probabilities(self, img, logit_scale=None):
        scale = 1.0 if logit_scale is None else float(logit_scale)
        m = img.flatten(1).mean(1) * self.weight
        logits = torch.stack([torch.zeros_like(m), torch.zeros_like(m), m], dim=1) * scale
        return logits.softmax(dim=1)


def test_quality_clip_loss_matches_hand_computation():
    stub = _StubPerceiver()
    loss = QualityCLIPLoss(loss_weight=0.05, perceiver=stub)
    assert stub.frozen and not stub.weight.requires_grad and not stub.training
    img = torch.tensor([0.5, 1.5]).view(2, 1, 1, 1).expand(2, 3, 2, 2).clone().requires_grad_(True)
    value = loss(img)
    p0 = math.exp(0.5) / (2 + math.exp(0.5))
    p1 = math.exp(1.0) / (2 + math.exp(1.0))  # clamped to 1
    assert value.item() == pytest.approx(0.05 * ((1 - p0) + (1 - p1)) / 2, rel=1e-6)
    value.backward()
    assert img.grad[0].abs().sum() > 0 and img.grad[1].abs().sum() == 0  # clamp cuts the second
    assert stub.weight.grad is None
    scaled = QualityCLIPLoss(perceiver=_StubPerceiver(), logit_scale=100.0)(torch.full((1, 3, 2, 2), 0.5))
    assert scaled.item() == pytest.approx(1 - math.exp(50) / (2 + math.exp(50)), abs=1e-6)


def test_quality_clip_loss_option_errors():
    with pytest.raises(ValueError, match="'perceiver' is required"):
        QualityCLIPLoss()
    with pytest.raises(ValueError, match='target_class'):
        QualityCLIPLoss(perceiver=_StubPerceiver(), target_class='superb')
    with pytest.raises(ValueError, match='logit_scale'):
        QualityCLIPLoss(perceiver=_StubPerceiver(), logit_scale='huge')


def test_quality_clip_loss_with_the_stage1_perceiver_built_from_options():
    torch.manual_seed(0)
    loss = build_loss({'type': 'QualityCLIPLoss', 'loss_weight': 0.05,
                       'perceiver': {'type': 'QualityPerceiver', 'clip_model': 'perceive-ir-tiny-clip'}})
    perceiver = loss.perceiver
    assert perceiver.is_frozen and not any(p.requires_grad for p in perceiver.parameters())
    img = torch.rand(2, 3, 32, 32, requires_grad=True)
    value = loss(img)
    with torch.no_grad():
        cos = perceiver.cosine(img)
    # release default: softmax over the raw cosines, class 'excellent' = index 2
    expected = 0.05 * (1 - cos.softmax(dim=1)[:, 2]).mean()
    assert value.item() == pytest.approx(expected.item(), rel=1e-5)
    assert 0.05 * 0.5 < value.item() < 0.05 * 0.8  # near-uniform: ≈ 2/3 (SPEC §11.6)
    value.backward()
    assert img.grad.abs().sum() > 0
    assert all(p.grad is None for p in perceiver.parameters())
    loss.train()
    assert not loss.training and not perceiver.training
