"""Stage 1 end to end: render-medium triplets, the triplet dataset, the metrics and prompt training."""
import json
import logging
import os

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from basicsr.archs import build_network
from basicsr.data.data_sampler import EnlargedSampler
from basicsr.metrics import calculate_metric
from perceive_ir_plugin import cli
from perceive_ir_plugin.archs.quality_perceiver_arch import QualityPerceiver
from perceive_ir_plugin.data.folds import fold_of
from perceive_ir_plugin.data.lmdb_io import LmdbImageWriter
from perceive_ir_plugin.data.pack_layout import pack_dir, write_pack_info
from perceive_ir_plugin.data.quality_triplet_dataset import QualityTripletDataset, shared_reader
from perceive_ir_plugin.tools.render_medium import denoise_noise_plan, render_medium, render_noisy
from perceive_ir_plugin.utils.tiling import tiled_forward

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_RESTORMER = {'type': 'Restormer', 'dim': 8, 'num_blocks': [1, 1, 1, 1], 'num_refinement_blocks': 1,
                  'heads': [1, 1, 1, 1]}
N_PER_TASK = 8


def _scene(rng, photos, height, width):
    photo = photos[int(rng.integers(len(photos)))]
    side = min(photo.shape[:2]) // 2
    y, x = rng.integers(0, photo.shape[0] - side), rng.integers(0, photo.shape[1] - side)
    return np.ascontiguousarray(cv2.resize(photo[y:y + side, x:x + side], (width, height),
                                           interpolation=cv2.INTER_AREA))


def _degrade(task, clean, rng):
    f = clean.astype(np.float32)
    if task == 'dehaze':
        f = 0.45 * f + 130
    elif task == 'lowlight':
        f = 0.25 * f
    elif task == 'derain':
        drops = (rng.random(f.shape[:2]) < 0.03).astype(np.float32)
        f = f + 200 * np.clip(cv2.filter2D(drops, -1, np.ones((7, 1), np.float32) / 2), 0, 1)[..., None]
    return np.clip(np.round(f), 0, 255).astype(np.uint8)


def make_small_packs(root, tasks=('denoise', 'derain', 'dehaze', 'lowlight'), count=N_PER_TASK, size=(48, 64)):
    """Tiny train packs in the plugin's layout from scikit-image photographs (denoise: GT only)."""
    from skimage import data as skd
    photos = [skd.astronaut(), skd.chelsea(), skd.coffee(), skd.rocket(), skd.immunohistochemistry()]
    rng = np.random.default_rng(0)
    for task in tasks:
        folder = pack_dir(root, 'train', task)
        os.makedirs(folder, exist_ok=True)
        with LmdbImageWriter(os.path.join(folder, 'gt.lmdb')) as gt, \
                (LmdbImageWriter(os.path.join(folder, 'lq.lmdb')) if task != 'denoise' else _Null()) as lq:
            for i in range(count):
                clean = _scene(rng, photos, *size)
                gt.put(f'{task}_{i:03d}', clean)
                if task != 'denoise':
                    lq.put(f'{task}_{i:03d}', _degrade(task, clean, rng))
        write_pack_info(folder, {'task': task, 'split': 'train', 'count': count, 'format': 'png',
                                 'source': 'test', 'has_lq': task != 'denoise'})
    return root


class _Null:

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.fixture(scope='module')
def rendered(tmp_path_factory):
    """Packs + two tiny random Restormer fold models + one render-medium run (through the CLI)."""
    root = tmp_path_factory.mktemp('stage1')
    make_small_packs(str(root / 'AiO'))
    ckpts = []
    for k in range(2):
        torch.manual_seed(10 + k)
        net = build_network(dict(TINY_RESTORMER))
        ckpts.append(str(root / f'medium_fold{k}.pth'))
        torch.save({'params': net.state_dict()}, ckpts[-1])
    opt_file = root / 'medium.yml'
    opt_file.write_text(yaml.safe_dump({'network_g': TINY_RESTORMER, 'datasets': {'train': {'dataroot': str(
        root / 'AiO')}}}))
    out = root / 'triplets'
    args = ['render-medium', '-opt', str(opt_file), '--checkpoints', *ckpts, '--out', str(out), '--tile', '32',
            '--overlap', '8', '--device', 'cpu']
    assert cli.main(args) == 0
    return {'root': root, 'out': out, 'ckpts': ckpts, 'args': args}


def _read(path, key):
    """Read one record (py-lmdb allows one open environment per path and process: share the readers)."""
    return shared_reader(path).read(key)


def _keys(path):
    return shared_reader(path).keys


def _manifest(out):
    with open(os.path.join(out, 'manifest.jsonl'), encoding='utf-8') as f:
        return [json.loads(line) for line in f]


def test_denoise_noise_plan_cycles_sigmas_over_sorted_keys():
    plan = denoise_noise_plan(['b', 'a', 'd', 'c'], sigmas=(15, 25, 50), seed=0)
    assert [plan[k][0] for k in 'abcd'] == [15, 25, 50, 15]
    assert len({s for _, s in plan.values()}) == 4
    assert plan == denoise_noise_plan(['a', 'b', 'c', 'd'], seed=0)
    assert plan['a'][1] != denoise_noise_plan(['a'], seed=1)['a'][1]
    clean = np.full((8, 8, 3), 128, np.uint8)
    noisy = render_noisy(clean, 25, plan['a'][1])
    assert noisy.dtype == np.uint8 and np.array_equal(noisy, render_noisy(clean, 25, plan['a'][1]))
    assert 15 < np.std(noisy.astype(float)) < 35


def test_render_medium_writes_aligned_cross_fitted_triplets(rendered):
    out, root = rendered['out'], rendered['root']
    entries = _manifest(out)
    assert len(entries) == 4 * N_PER_TASK
    info = json.loads((out / 'triplets.json').read_text())
    assert info['n_folds'] == 2 and info['tile'] == 32 and set(info['tasks']) == {'denoise', 'derain', 'dehaze',
                                                                                  'lowlight'}
    nets = []
    for path in rendered['ckpts']:
        net = build_network(dict(TINY_RESTORMER))
        net.load_state_dict(torch.load(path, weights_only=True)['params'])
        nets.append(net.eval())
    checked_folds = set()
    for e in entries:
        assert e['fold'] == fold_of(e['task'], e['key'])
        paths = {t: e[t] if os.path.isabs(e[t]) else os.path.join(out, e[t]) for t in ('low', 'medium', 'high')}
        assert paths['high'] == os.path.join(root, 'AiO', 'train', e['task'], 'gt.lmdb')
        low = _read(paths['low'], e['key'])
        if e['task'] == 'denoise':
            assert paths['low'] == os.path.join(out, 'denoise', 'lq.lmdb')
            clean = _read(paths['high'], e['key'])
            assert np.array_equal(low, render_noisy(clean, e['sigma'], e['noise_seed']))
        else:
            assert e['sigma'] == 0 and paths['low'] == os.path.join(root, 'AiO', 'train', e['task'], 'lq.lmdb')
        if e['fold'] not in checked_folds:  # the medium image is fold k's model on the low image
            checked_folds.add(e['fold'])
            x = torch.from_numpy(np.ascontiguousarray(low)).permute(2, 0, 1).float().div(255)[None]
            with torch.no_grad():
                y = tiled_forward(nets[e['fold']], x, tile=32, overlap=8, multiple=8)
            expected = y.clamp(0, 1).mul(255).round().byte()[0].permute(1, 2, 0).numpy()
            assert np.array_equal(_read(paths['medium'], e['key']), expected)
    assert checked_folds == {0, 1}
    sigmas = [e['sigma'] for e in sorted(entries, key=lambda e: e['key']) if e['task'] == 'denoise']
    assert sigmas[:4] == [15, 25, 50, 15]


def test_render_medium_resumes_without_rendering_again(rendered, capsys):
    before = _manifest(rendered['out'])
    assert cli.main(rendered['args']) == 0
    assert '(0 rendered now, 8 resumed)' in capsys.readouterr().out
    assert _manifest(rendered['out']) == before


def test_render_medium_errors(rendered, tmp_path, capsys):
    wrong = tmp_path / 'wrong.pth'
    torch.save({'params': {'conv.weight': torch.zeros(1)}}, wrong)
    args = list(rendered['args'])
    args[args.index('--out') + 1] = str(tmp_path / 'out')
    args[args.index('--checkpoints') + 2] = str(wrong)
    assert cli.main(args) == 1
    err = capsys.readouterr().err
    assert "--checkpoints[1] (fold 1)" in err and 'does not fit Restormer' in err
    with pytest.raises(ValueError, match='one model per fold'):
        render_medium(str(rendered['root'] / 'AiO'), str(tmp_path / 'o'), TINY_RESTORMER, rendered['ckpts'][:1])


def _identity_manifest(root, out):
    """Triplets whose three tiers are the same GT image (to test crop synchronisation)."""
    os.makedirs(out, exist_ok=True)
    lines = []
    for task in ('derain', 'dehaze'):
        gt = os.path.join(root, 'AiO', 'train', task, 'gt.lmdb')
        for key in _keys(gt):
            lines.append({'task': task, 'key': key, 'fold': fold_of(task, key), 'low': gt, 'medium': gt, 'high': gt})
    with open(os.path.join(out, 'manifest.jsonl'), 'w', encoding='utf-8') as f:
        f.write(''.join(json.dumps(e) + '\n' for e in lines))
    return out


def test_triplet_dataset_crops_are_synchronised_and_upscaled(rendered, tmp_path):
    import random
    out = _identity_manifest(str(rendered['root']), str(tmp_path / 'same'))
    random.seed(0)
    train = QualityTripletDataset({'dataroot': out, 'phase': 'train', 'gt_size': 224, 'use_vflip': True})
    for i in range(12):
        item = train[i]
        assert item['lq'].shape == (3, 224, 224) and item['lq'].dtype == torch.float32
        assert torch.equal(item['lq'], item['medium']) and torch.equal(item['lq'], item['gt'])
        assert 0 <= item['lq'].min() and item['lq'].max() <= 1
    val = QualityTripletDataset({'dataroot': str(rendered['out']), 'phase': 'val', 'gt_size': 224})
    item = val[0]
    entry = val.entries[0]
    high = val._reader(entry['high'], entry['task']).read(entry['key'])  # 48x64 -> upscaled to 224x299, centre crop
    up = cv2.resize(high, (299, 224), interpolation=cv2.INTER_CUBIC)
    expected = torch.from_numpy(np.ascontiguousarray(up[:, 37:261])).permute(2, 0, 1).float() / 255
    assert torch.equal(item['gt'], expected)
    assert item['task_name'] == entry['task'] and item['key'] == f"{entry['task']}/{entry['key']}"
    five = QualityTripletDataset({'dataroot': str(rendered['out']), 'phase': 'val', 'gt_size': 224,
                                  'five_crop': True})[0]
    assert five['gt'].shape == (5, 3, 224, 224)
    top_left = torch.from_numpy(np.ascontiguousarray(up[:, :224])).permute(2, 0, 1).float() / 255
    assert torch.equal(five['gt'][4], expected) and torch.equal(five['gt'][0], top_left)


def test_triplet_dataset_task_balance_and_filters(rendered):
    out = str(rendered['out'])
    ds = QualityTripletDataset({'dataroot': out, 'phase': 'train', 'gt_size': 224, 'folds': [0]})
    counts = {t: len(v) for t, v in ds.by_task.items()}
    assert all(e['fold'] == 0 for v in ds.by_task.values() for e in v)
    assert len(ds) == 4 * max(counts.values())
    sampler = EnlargedSampler(ds, num_replicas=1, rank=0, ratio=1)
    seen = [ds.tasks[i % 4] for i in sampler]
    assert {t: seen.count(t) for t in ds.tasks} == {t: max(counts.values()) for t in ds.tasks}
    small = min(counts, key=counts.get)  # the smallest task is repeated (sampled with replacement)
    keys = [ds._entry(i)['key'] for i in range(len(ds)) if ds.tasks[i % 4] == small]
    assert set(keys) == {e['key'] for e in ds.by_task[small]}
    val = QualityTripletDataset({'dataroot': out, 'phase': 'val', 'tasks': ['dehaze'], 'max_per_task': 3})
    assert len(val) == 3 and val.tasks == ['dehaze']
    with pytest.raises(FileNotFoundError, match='render-medium'):
        QualityTripletDataset({'dataroot': str(rendered['root']), 'phase': 'val'})
    with pytest.raises(ValueError, match=r"no triplets of task\(s\) \['deblur'\]"):
        QualityTripletDataset({'dataroot': out, 'phase': 'val', 'tasks': ['deblur']})


def test_quality_metrics_hand_computed():
    probs = np.array([
        [[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.1, 0.1, 0.8]],  # all right, expected index 0.3 < 0.9 < 1.7
        [[0.1, 0.8, 0.1], [0.6, 0.3, 0.1], [0.1, 0.2, 0.7]],  # only high right; 1.0 > 0.5: not monotonic
        [[0.5, 0.4, 0.1], [0.5, 0.1, 0.4], [0.41, 0.2, 0.39]],  # only low right; 0.6 < 0.9 < 0.98 monotonic
    ])
    acc = lambda **o: calculate_metric({'probs': probs}, {'type': 'calculate_tier_accuracy', **o})  # noqa: E731
    assert acc() == pytest.approx(5 / 9)
    assert acc(tier='low') == pytest.approx(2 / 3) and acc(tier='medium') == pytest.approx(1 / 3)
    assert acc(tier='high', better='higher') == pytest.approx(2 / 3)
    assert calculate_metric({'probs': probs}, {'type': 'calculate_strict_triplet_rate'}) == pytest.approx(1 / 3)
    assert calculate_metric({'probs': torch.tensor(probs)}, {'type': 'calculate_monotonic_rate'}) == pytest.approx(
        2 / 3)
    with pytest.raises(ValueError, match='tier must be one of'):
        acc(tier='best')
    with pytest.raises(ValueError, match=r'\(N, 3, C\)'):
        calculate_metric({'probs': probs[:, :2]}, {'type': 'calculate_strict_triplet_rate'})


def _blend_triplets(root, out):
    """dehaze / low-light triplets with medium = (low + high) / 2, in render-medium's manifest format.

    The tiny random CLIP cannot tell images apart as well as a real one; photometric degradations
    with a medium tier half-way between low and high give it a learnable, held-out-testable task.
    """
    lines = []
    for task in ('dehaze', 'lowlight'):
        src = os.path.join(root, 'AiO', 'train', task)
        os.makedirs(os.path.join(out, task), exist_ok=True)
        with LmdbImageWriter(os.path.join(out, task, 'medium.lmdb')) as medium:
            for key in _keys(os.path.join(src, 'gt.lmdb')):
                low = _read(os.path.join(src, 'lq.lmdb'), key).astype(np.float32)
                blend = (low + _read(os.path.join(src, 'gt.lmdb'), key).astype(np.float32)) / 2
                medium.put(key, np.round(blend).astype(np.uint8))
                lines.append({'task': task, 'key': key, 'fold': fold_of(task, key), 'low': os.path.join(src, 'lq.lmdb'),
                              'medium': f'{task}/medium.lmdb', 'high': os.path.join(src, 'gt.lmdb')})
    with open(os.path.join(out, 'manifest.jsonl'), 'w', encoding='utf-8') as f:
        f.write(''.join(json.dumps(e) + '\n' for e in lines))
    return out


def _evaluate(net, dataset):
    """Cross-entropy and tier accuracy of ``net`` over the (centre-cropped) triplets of ``dataset``."""
    logits, labels = [], []
    with torch.no_grad():
        for i in range(len(dataset)):
            item = dataset[i]
            logits.append(net(torch.stack([item['lq'], item['medium'], item['gt']])))
            labels.append(torch.arange(3))
    logits, labels = torch.cat(logits), torch.cat(labels)
    return F.cross_entropy(logits, labels).item(), (logits.argmax(-1) == labels).float().mean().item()


def test_stage1_prompt_training_learns_tiers(tmp_path, monkeypatch):
    from perceive_ir_plugin.train import main as train_main
    make_small_packs(str(tmp_path / 'AiO'), tasks=('dehaze', 'lowlight'), count=24, size=(64, 64))
    out = _blend_triplets(str(tmp_path), str(tmp_path / 'blend'))
    with open(os.path.join(REPO, 'options', 'train', 'PerceiveIR', 'stage1_prompts.yml'), encoding='utf-8') as f:
        opt = yaml.safe_load(f)
    opt.update(name='stage1_prompts_tiny', num_gpu=0, manual_seed=0)
    opt['datasets']['train'].update(dataroot=out, folds=[0], batch_size_per_gpu=4, num_worker_per_gpu=0,
                                    prefetch_mode=None, pin_memory=False)
    opt['datasets']['val'].update(dataroot=out, folds=[1], max_per_task=None, five_crop=False)
    opt['network_g'] = {'type': 'QualityPerceiver', 'clip_model': 'perceive-ir-tiny-clip', 'n_ctx': 4}
    opt['train'].update(total_iter=60)
    opt['train']['scheduler']['T_max'] = 60
    opt['train']['optim_g']['lr'] = 5e-3
    opt['val']['val_freq'] = 60
    opt['logger'].update(print_freq=20, save_checkpoint_freq=60, use_tb_logger=False)
    opt_file = tmp_path / 'stage1_tiny.yml'
    opt_file.write_text(yaml.safe_dump(opt))
    monkeypatch.chdir(tmp_path)

    train_set = QualityTripletDataset({'dataroot': out, 'phase': 'val', 'folds': [0]})
    held_out = QualityTripletDataset({'dataroot': out, 'phase': 'val', 'folds': [1]})
    initial = QualityPerceiver(clip_model='perceive-ir-tiny-clip', n_ctx=4)  # same CLIP (fixed seed)
    records = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    logger = logging.getLogger('basicsr')  # may exist at level NOTSET (made by another test without a file)
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        assert train_main(['-opt', str(opt_file)]) == 0
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    log = '\n'.join(records)
    for name in ('acc', 'acc_low', 'acc_medium', 'acc_high', 'strict', 'monotonic', 'acc_low_dehaze',
                 'monotonic_lowlight'):
        assert f'# {name}: ' in log

    models = tmp_path / 'experiments' / 'stage1_prompts_tiny' / 'models'
    net_file = torch.load(models / 'net_g_latest.pth', weights_only=True)
    assert set(net_file['params']) == {'prompt_learner.context', 'prompt_learner.token_prefix',
                                       'prompt_learner.token_suffix', 'prompt_learner.tokenized_prompts'}
    trained = QualityPerceiver(clip_model='perceive-ir-tiny-clip', n_ctx=4,
                               prompt_weights=str(models / 'quality_prompts_latest.pth'))
    assert trained.prompt_meta['task_balanced'] is True
    loss0, _ = _evaluate(initial, train_set)
    loss1, _ = _evaluate(trained, train_set)
    _, acc_before = _evaluate(initial, held_out)
    _, acc_after = _evaluate(trained, held_out)
    assert loss1 < 0.5 * loss0
    assert acc_after > 0.5 and acc_after > acc_before  # chance is 1/3

    # The BasicSR network file loads back through path.pretrain_network_g (test mode) with identical logits.
    from basicsr.models import build_model
    test_opt = dict(opt, is_train=False, dist=False, rank=0, world_size=1, datasets={},
                    path={'pretrain_network_g': str(models / 'net_g_latest.pth'), 'results_root': str(tmp_path)})
    model = build_model(test_opt)
    item = held_out[0]
    model.feed_data({k: (v[None] if torch.is_tensor(v) else [v]) for k, v in item.items()})
    model.test()
    trained_logits = trained(torch.stack([item['lq'], item['medium'], item['gt']]))
    assert torch.allclose(model.output, trained_logits, atol=1e-5)


def test_stage1_option_files_follow_the_spec():
    from basicsr.utils.registry import ARCH_REGISTRY, DATASET_REGISTRY, METRIC_REGISTRY, MODEL_REGISTRY
    folder = os.path.join(REPO, 'options', 'train', 'PerceiveIR')
    load = lambda name: yaml.safe_load(open(os.path.join(folder, name), encoding='utf-8'))  # noqa: E731
    for k in (0, 1):
        opt = load(f'stage1_medium_fold{k}.yml')
        assert opt['model_type'] == 'ImageRestorationModel' and opt['model_type'] in MODEL_REGISTRY
        data = opt['datasets']['train']
        assert data['type'] == 'AllInOneDataset' and data['folds'] == [1 - k]  # trained without fold k
        assert data['tasks'] == {'denoise': 3, 'dehaze': 1, 'derain': 120, 'deblur': 50, 'lowlight': 40}
        assert (data['gt_size'], data['batch_size_per_gpu'], data['use_hflip'], data['use_vflip']) == (128, 4, True,
                                                                                                      True)
        train = opt['train']
        assert train['optim_g'] == {'type': 'AdamW', 'lr': 2e-4, 'weight_decay': 1e-2, 'betas': [0.9, 0.999]}
        assert train['scheduler'] == {'type': 'TrueCosineAnnealingLR', 'T_max': 20000, 'eta_min': 1e-6}
        assert train['total_iter'] == 20000 and train['pixel_opt']['type'] == 'L1Loss' and train['autocast'] == 'bf16'
        assert set(train) & {'perceptual_opt', 'ema_decay'} == set()
        with torch.device('meta'):
            net = build_network(dict(opt['network_g']))
        assert type(net).__name__ == 'Restormer' and net.size_multiple == 8
    opt = load('stage1_prompts.yml')
    assert opt['model_type'] == 'QualityPromptModel' and opt['model_type'] in MODEL_REGISTRY
    assert opt['network_g']['type'] in ARCH_REGISTRY and opt['network_g']['clip_model'] == 'ViT-B-32-quickgelu'
    assert (opt['network_g']['n_ctx'], opt['network_g']['class_names']) == (16, ['terrible', 'mediocre', 'excellent'])
    assert all(d['type'] in DATASET_REGISTRY for d in opt['datasets'].values())
    assert opt['datasets']['train']['gt_size'] == 224 and opt['datasets']['train']['balance_tasks'] is True
    train = opt['train']
    assert train['optim_g'] == {'type': 'AdamW', 'lr': 4e-5, 'weight_decay': 1e-2, 'betas': [0.9, 0.999]}
    assert train['scheduler'] == {'type': 'TrueCosineAnnealingLR', 'T_max': 100000, 'eta_min': 1e-6}
    assert train['total_iter'] == 100000
    assert {m['type'] for m in opt['val']['metrics'].values()} == {
        'calculate_tier_accuracy', 'calculate_strict_triplet_rate', 'calculate_monotonic_rate'}
    assert all(m['type'] in METRIC_REGISTRY for m in opt['val']['metrics'].values())
