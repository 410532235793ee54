"""The steps of ``perceive-ir demo``, each a function of a :class:`DemoConfig` (and earlier results).

Order (each step writes under ``<out>/work``; the report goes to ``<out>``)::

    make_packs          real photographs (scikit-image) degraded per task -> LMDB packs (train/test)
    train_medium        two cross-fitted tiny L1 restorers (stage 1a), BasicSR train_pipeline
    render_triplets     perceive-ir render-medium -> low/medium/high triplets
    train_prompts       quality prompts in a frozen CLIP (stage 1b), QualityPromptModel
    init_backbone       one random backbone initialisation shared by both stage-2 runs
    train_stage2        Perceive-IR (all losses) and the same backbone with L1 only:
                        same data, iterations, seed and initial backbone weights
    test_models         BasicSR test_pipeline on both -> per-task PSNR/SSIM + restored images
    write_report        results.md / results.csv / losses.png / psnr_per_task.png / strips/*.png

Option files come from ``options/demo/*.yml`` (readable, runnable by hand); :func:`build_options`
fills in absolute paths, the device, the weights files and (``quick``) smaller sizes, and the
resolved copies are written to ``<out>/work/options/`` so every run can be repeated alone.
"""
import copy
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field

import yaml

from perceive_ir_plugin.demo import logs, report

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OPTIONS_DIR = os.path.join(REPO_ROOT, 'options', 'demo')
TEMPLATES = ('medium_fold0', 'medium_fold1', 'prompts', 'stage2_perceiveir', 'stage2_l1', 'test_perceiveir',
             'test_l1')
WORK_MARKER = '.perceive-ir-demo'
RANDOM_NOTE = 'RANDOM-INITIALISED'


@dataclass
class DemoConfig:
    """What the demo runs.

    Attributes:
        out (str): Report folder (``results/demo``); work files go to ``<out>/work``.
        device (str): ``auto``, ``cpu`` or ``cuda`` (``auto``: CUDA when available).
        quick (bool): Tiny sizes and a few iterations (the test uses this; ~1 min on 2 cores).
        clip_weights, dino_weights, vgg_weights (str | None): Local weight files; without
            them the corresponding frozen network is randomly initialised (and labelled so).
        seed (int): Seed of both stage-2 runs (and the shared backbone initialisation).
        progress (bool): tqdm bars on stderr.
    """
    out: str = 'results/demo'
    device: str = 'auto'
    quick: bool = False
    clip_weights: str = None
    dino_weights: str = None
    vgg_weights: str = None
    seed: int = 0
    progress: bool = True
    timings: dict = field(default_factory=dict)

    @property
    def work(self):
        return os.path.join(os.path.abspath(self.out), 'work')

    @property
    def dataroot(self):
        return os.path.join(self.work, 'datasets', 'AiO')

    @property
    def triplet_root(self):
        return os.path.join(self.work, 'datasets', 'AiO_stage1')

    def resolved_device(self):
        """``'cpu'`` or ``'cuda'``."""
        import torch
        if self.device == 'auto':
            return 'cuda' if torch.cuda.is_available() else 'cpu'
        if self.device == 'cuda' and not torch.cuda.is_available():
            raise RuntimeError('--device cuda was given but CUDA is not available; use --device cpu or auto.')
        if self.device not in ('cpu', 'cuda'):
            raise ValueError(f"--device must be auto, cpu or cuda, got '{self.device}'.")
        return self.device


# Sizes of the two modes. 'full' is what `perceive-ir demo` runs (about 15 minutes on 2 CPU cores);
# 'quick' is the smoke-test version.
SIZES = {
    'full': {
        'packs': {'max_side': 128},
        'medium_iters': 150, 'medium_crop': 48,
        'prompt_iters': 60, 'prompt_crop': 64,
        'stage2_iters': 300, 'stage2_crop': 48, 'stage2_batch': 4,
    },
    'quick': {
        'packs': {'max_side': 48},
        'medium_iters': 2, 'medium_crop': 32,
        'prompt_iters': 2, 'prompt_crop': 32,
        'stage2_iters': 3, 'stage2_crop': 32, 'stage2_batch': 4,
    },
}


def sizes(cfg):
    """The size table of ``cfg``'s mode."""
    return SIZES['quick' if cfg.quick else 'full']


def check_weight_files(cfg):
    """Every given weights file must exist (checked before any work starts).

    Raises:
        FileNotFoundError: Naming the command-line option and the path.
    """
    for flag, path in (('--clip-weights', cfg.clip_weights), ('--dino-weights', cfg.dino_weights),
                       ('--vgg-weights', cfg.vgg_weights)):
        if path is not None and not os.path.isfile(path):
            raise FileNotFoundError(f"{flag}: weights file '{path}' does not exist.")


def weight_labels(cfg):
    """Human-readable status of the three frozen networks (used in the summary and report).

    Returns:
        dict[str, str]: ``clip``, ``dino``, ``vgg`` → description.
    """
    def label(name, path, random_desc):
        if path:
            return f'{name}: pretrained weights from {os.path.abspath(path)}'
        return f'{name}: {RANDOM_NOTE} ({random_desc}; no local weights file given)'
    return {
        'clip': label('CLIP', cfg.clip_weights, 'tiny random CLIP perceive-ir-tiny-clip'),
        'dino': label('DINOv2', cfg.dino_weights, 'tiny random ViT in the DINOv2 code path'),
        'vgg': label('VGG-16', cfg.vgg_weights, 'random VGG-16 features[:16]'),
    }


# ---------------------------------------------------------------------------------------------------
# options
# ---------------------------------------------------------------------------------------------------
def load_template(name):
    """Read ``options/demo/<name>.yml``.

    Raises:
        FileNotFoundError: The demo option files are missing (e.g. a non-editable install).
    """
    path = os.path.join(OPTIONS_DIR, f'{name}.yml')
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Demo option file '{path}' not found; run the demo from a checkout of "
                                'perceive-ir-plugin installed with `pip install -e .` (make demo does this).')
    with open(path, encoding='utf-8') as f:
        return yaml.safe_load(f)


def _set_device(opt, device):
    opt['num_gpu'] = 1 if device == 'cuda' else 0


def _training_template(name, device, dataroot, crop, iters):
    """Load a demo training template and size it: device, training data root and crop, iterations.

    Returns:
        tuple[dict, dict]: The option dict and its ``datasets.train`` section (for further edits).
    """
    opt = load_template(name)
    _set_device(opt, device)
    ds = opt['datasets']['train']
    ds['dataroot'] = dataroot
    ds['gt_size'] = crop
    opt['train']['total_iter'] = iters
    opt['train']['scheduler']['T_max'] = iters
    return opt, ds


def build_options(cfg, paths=None):
    """Resolved option dicts of every demo run.

    Args:
        cfg (DemoConfig): The demo configuration.
        paths (dict, optional): Files produced by earlier steps: ``medium`` (list of the two
            fold checkpoints), ``prompts`` (prompts file), ``init_backbone`` (shared initial
            backbone weights), ``stage2`` (``{'perceiveir': .., 'l1': ..}`` final weights).
            Missing entries leave the template values.

    Returns:
        dict[str, dict]: template name → option dict.
    """
    paths = paths or {}
    s = sizes(cfg)
    device = cfg.resolved_device()
    opts = {}
    for k in (0, 1):
        opts[f'medium_fold{k}'], _ = _training_template(f'medium_fold{k}', device, cfg.dataroot,
                                                         s['medium_crop'], s['medium_iters'])

    opt, ds = _training_template('prompts', device, cfg.triplet_root, s['prompt_crop'], s['prompt_iters'])
    if cfg.clip_weights:
        opt['network_g'].update(clip_model='ViT-B-32-quickgelu', clip_weights=os.path.abspath(cfg.clip_weights))
        ds['gt_size'] = 224  # real CLIP sees 224 crops (smaller images are upscaled by the dataset)
    opts['prompts'] = opt

    for run in ('perceiveir', 'l1'):
        opt, ds = _training_template(f'stage2_{run}', device, cfg.dataroot, s['stage2_crop'], s['stage2_iters'])
        opt['manual_seed'] = cfg.seed
        ds['batch_size_per_gpu'] = s['stage2_batch']
        if opt['train'].get('dpl_probe'):
            opt['train']['dpl_probe']['crop'] = s['stage2_crop']
        if paths.get('init_backbone'):
            key = 'pretrain_network_backbone' if run == 'perceiveir' else 'pretrain_network_g'
            opt['path'][key] = paths['init_backbone']
        if run == 'perceiveir':
            configure_perceiveir(opt, cfg, paths)
        opts[f'stage2_{run}'] = opt

        test = load_template(f'test_{run}')
        _set_device(test, device)
        for ds in test['datasets'].values():
            ds['dataroot'] = cfg.dataroot
        if run == 'perceiveir':
            configure_perceiveir_network(test['network_g'], cfg)
        if (paths.get('stage2') or {}).get(run):
            test['path']['pretrain_network_g'] = paths['stage2'][run]
        opts[f'test_{run}'] = test
    return opts


def configure_perceiveir_network(net_opt, cfg):
    """Point the Perceive-IR network's frozen DINOv2 at ``--dino-weights`` (else keep the tiny random one)."""
    if cfg.dino_weights:
        net_opt.update(sgm_config='dinov2_vitb14', sgm_weights=os.path.abspath(cfg.dino_weights),
                       sgm_allow_random=False)
    else:
        net_opt.update(sgm_weights=None, sgm_allow_random=True)


def configure_perceiveir(opt, cfg, paths):
    """Fill in the stage-2 Perceive-IR specifics: weights of the frozen networks, prompts and proxies."""
    configure_perceiveir_network(opt['network_g'], cfg)
    train = opt['train']
    clip_opt = train.get('clip_opt')
    if clip_opt is not None:
        perceiver = clip_opt.setdefault('perceiver', {'type': 'QualityPerceiver'})
        if cfg.clip_weights:
            perceiver.update(clip_model='ViT-B-32-quickgelu', clip_weights=os.path.abspath(cfg.clip_weights))
        if paths.get('prompts'):
            perceiver['prompt_weights'] = paths['prompts']
    dpl_opt = train.get('dpl_opt')
    if dpl_opt is not None:
        if cfg.vgg_weights:
            dpl_opt.update(vgg_weights=os.path.abspath(cfg.vgg_weights), allow_random_vgg=False)
        else:
            dpl_opt.update(vgg_weights=None, allow_random_vgg=True)
    medium = paths.get('medium')
    for proxy in train.get('proxies') or []:
        if medium and 'fold_checkpoints' in proxy:
            proxy['fold_checkpoints'] = list(medium)


def write_options(opt, path):
    """Write an option dict as YAML (creating the folder)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'w', encoding='utf-8') as f:
        yaml.safe_dump(opt, f, sort_keys=False)
    return path


# ---------------------------------------------------------------------------------------------------
# running BasicSR pipelines in this process
# ---------------------------------------------------------------------------------------------------
def _bar(cfg, total, desc):
    if not cfg.progress:
        return None
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit='it', leave=False, dynamic_ncols=True)


def run_basicsr(kind, opt, cfg, label, total=None):
    """Run BasicSR's train or test pipeline on ``opt`` (through the plugin's entry points).

    The resolved options are written to ``<work>/options/<label>.yml`` and the run's log to
    ``<work>/logs/<label>.log``.

    Returns:
        list[str]: The captured log messages.
    """
    from perceive_ir_plugin.test import main as test_main
    from perceive_ir_plugin.train import main as train_main
    opt_path = write_options(opt, os.path.join(cfg.work, 'options', f'{label}.yml'))
    log_path = os.path.join(cfg.work, 'logs', f'{label}.log')
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    bar = _bar(cfg, total, label) if total else None
    start = time.time()
    try:
        with logs.capture_basicsr_log(log_path, progress=bar) as messages:
            entry = train_main if kind == 'train' else test_main
            entry(['-opt', opt_path], root_path=cfg.work)
    finally:
        if bar is not None:
            bar.close()
    cfg.timings[label] = time.time() - start
    return list(messages)


def _model_file(cfg, name, filename):
    path = os.path.join(cfg.work, 'experiments', name, 'models', filename)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Expected '{path}' after training {name}; see {cfg.work}/logs/.")
    return path


# ---------------------------------------------------------------------------------------------------
# steps
# ---------------------------------------------------------------------------------------------------
def prepare_work_dir(cfg):
    """Create ``<out>/work``; a previous demo's work folder (marked by the demo) is replaced.

    Raises:
        FileExistsError: ``<out>/work`` exists but was not made by the demo (never deleted).
    """
    work = cfg.work
    if os.path.isdir(work):
        if not os.path.isfile(os.path.join(work, WORK_MARKER)):
            raise FileExistsError(f"'{work}' exists and was not created by perceive-ir demo; choose another --out "
                                  'or remove it yourself.')
        shutil.rmtree(work)
    os.makedirs(work)
    with open(os.path.join(work, WORK_MARKER), 'w', encoding='utf-8') as f:
        f.write('Created by `perceive-ir demo`; replaced by the next demo run with the same --out.\n')
    return work


def make_packs(cfg):
    """Pack the embedded photographs (scikit-image) degraded per task into train/test LMDBs.

    Returns:
        str: The data root (``<work>/datasets/AiO``).
    """
    from perceive_ir_plugin.data.demo_data import make_demo_packs
    start = time.time()
    make_demo_packs(cfg.dataroot, **sizes(cfg)['packs'])
    cfg.timings['pack'] = time.time() - start
    return cfg.dataroot


def train_medium(cfg, opts):
    """Train the two cross-fitted medium restorers; returns their final weights, fold order."""
    out = []
    for k in (0, 1):
        opt = opts[f'medium_fold{k}']
        run_basicsr('train', opt, cfg, opt['name'], total=opt['train']['total_iter'])
        out.append(_model_file(cfg, opt['name'], 'net_g_latest.pth'))
    return out


def render_triplets(cfg, opts, medium):
    """``perceive-ir render-medium`` over the training split with the two fold models."""
    from perceive_ir_plugin.tools.render_medium import render_medium
    start = time.time()
    render_medium(cfg.dataroot, cfg.triplet_root, opts['medium_fold0']['network_g'], medium, split='train',
                  tile=0, device=cfg.resolved_device())
    cfg.timings['render-medium'] = time.time() - start
    return cfg.triplet_root


def train_prompts(cfg, opts):
    """Learn the quality prompts; returns the prompts file."""
    opt = opts['prompts']
    messages = run_basicsr('train', opt, cfg, opt['name'], total=opt['train']['total_iter'])
    return _model_file(cfg, opt['name'], 'quality_prompts_latest.pth'), logs.parse_train_log(messages)


def init_backbone(cfg, opts):
    """Build the stage-2 backbone once with ``cfg.seed`` and save it: both runs start from these weights."""
    import torch
    from basicsr.archs import build_network
    torch.manual_seed(cfg.seed)
    net = build_network(copy.deepcopy(opts['stage2_l1']['network_g']))
    path = os.path.join(cfg.work, 'experiments', 'init_backbone.pth')
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save({'params': net.state_dict()}, path)
    return path


def train_stage2(cfg, opts):
    """Train Perceive-IR and the L1-only baseline; returns final weights and loss curves per run."""
    weights, curves = {}, {}
    for run in ('perceiveir', 'l1'):
        opt = opts[f'stage2_{run}']
        messages = run_basicsr('train', opt, cfg, opt['name'], total=opt['train']['total_iter'])
        weights[run] = _model_file(cfg, opt['name'], 'net_g_latest.pth')
        curves[run] = logs.parse_train_log(messages)
    return weights, curves


def test_datasets(opt):
    """``(task, dataset name, options)`` of a test option file, in its order."""
    return [(ds.get('task') or (ds.get('tasks') or ['?'])[0], ds['name'], ds) for _, ds in
            sorted(opt['datasets'].items())]


def test_models(cfg, opts):
    """BasicSR test_pipeline on both stage-2 models.

    Returns:
        dict: ``metrics`` (run → dataset → metric → value) and ``visualization`` (run →
        folder of the restored images).
    """
    metrics, folders = {}, {}
    for run in ('perceiveir', 'l1'):
        opt = opts[f'test_{run}']
        messages = run_basicsr('test', opt, cfg, opt['name'])
        metrics[run] = logs.parse_validation_log(messages)
        folders[run] = os.path.join(cfg.work, 'results', opt['name'], 'visualization')
    return {'metrics': metrics, 'visualization': folders}


def _tensor_to_uint8(t):
    import numpy as np
    return (t.detach().float().clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).cpu().numpy()).astype(np.uint8)


def make_strips(cfg, opts, visualization, out_dir, per_task=1):
    """Image strips ``degraded | L1 only | Perceive-IR | ground truth`` of the first test images per task.

    The degraded and ground-truth images come from the test dataset itself (as the test
    pipeline saw them); the two restorations from the test pipeline's saved PNGs.

    Returns:
        list[str]: Written PNG files (one per task, then ``all_tasks.png``).
    """
    import cv2
    from basicsr.data import build_dataset
    opt = opts['test_l1']
    written, rows = [], []
    for task, name, ds_opt in test_datasets(opt):
        dataset = build_dataset(dict(ds_opt, phase='test'))
        strips = []
        for index in range(min(per_task, len(dataset))):
            sample = dataset[index]
            path = sample['lq_path']
            img_name = os.path.splitext(os.path.basename(path))[0]
            panels = [('degraded', _tensor_to_uint8(sample['lq']))]
            for run, caption in (('l1', 'L1 only'), ('perceiveir', 'Perceive-IR')):
                run_name = opts[f'test_{run}']['name']
                file = os.path.join(visualization[run], name, f'{img_name}_{run_name}.png')
                img = cv2.imread(file, cv2.IMREAD_COLOR)
                if img is None:
                    raise FileNotFoundError(f"Restored image '{file}' of the {caption} test run not found.")
                panels.append((caption, img[..., ::-1]))
            panels.append(('ground truth', _tensor_to_uint8(sample['gt'])))
            strips.append(report.image_strip(panels))
        strip = report.stack_rows(strips)
        file = os.path.join(out_dir, f'{task}_{name}.png' if name != task else f'{task}.png')
        report.save_png(file, strip)
        written.append(file)
        rows.append(strip)
    if rows:
        file = os.path.join(out_dir, 'all_tasks.png')
        report.save_png(file, report.stack_rows(rows))
        written.append(file)
    return written


def write_report(cfg, opts, tested, curves, prompt_curve=None):
    """Write the table (md + CSV), plots, strips and ``summary.json`` into ``cfg.out``.

    Returns:
        dict: Paths of the written files and the table rows.
    """
    out = os.path.abspath(cfg.out)
    datasets = []
    for task, name, ds_opt in test_datasets(opts['test_l1']):
        datasets.append((task, name, _count_images(cfg, opts, name)))
    rows = report.results_rows(tested['metrics'], datasets)
    files = {'markdown': os.path.join(out, 'results.md'), 'csv': os.path.join(out, 'results.csv'),
             'losses': os.path.join(out, 'losses.png'), 'psnr': os.path.join(out, 'psnr_per_task.png'),
             'summary': os.path.join(out, 'summary.json')}
    report.write_csv(files['csv'], rows)
    report.plot_losses(curves, files['losses'])
    report.plot_psnr(rows, files['psnr'])
    files['strips'] = make_strips(cfg, opts, tested['visualization'], os.path.join(out, 'strips'))
    labels = weight_labels(cfg)
    s = sizes(cfg)
    net_l1 = opts['stage2_l1']['network_g']
    notes = [
        'Data: stand-ins for the real benchmarks -- scikit-image photographs degraded synthetically per task '
        '(Gaussian noise, rain streaks, haze, motion blur, low light), not BSD68/Rain100L/SOTS/GoPro/LOL.',
        f"Mode: {'quick (smoke test)' if cfg.quick else 'full'}; device {cfg.resolved_device()}; both stage-2 "
        f"runs: {s['stage2_iters']} iterations, batch {s['stage2_batch']}, {s['stage2_crop']}px crops, seed "
        f'{cfg.seed}, identical initial backbone weights; backbone {net_l1["type"]} '
        f'({", ".join(f"{k}={v}" for k, v in net_l1.items() if k != "type")}).',
        *(f'**{v}**' if RANDOM_NOTE in v else v for v in labels.values()),
        'These are tiny CPU models trained for minutes: the numbers show that the pipeline works end to end, '
        'not the paper\'s results (see the README for those).',
    ]
    timing = '\n'.join(f'| {k} | {v:.1f} s |' for k, v in cfg.timings.items())
    sections = [('Files', '- `results.csv`: the table above\n- `losses.png`: loss curves of both runs\n'
                 '- `psnr_per_task.png`: PSNR per task\n- `strips/`: degraded | L1 only | Perceive-IR | ground '
                 'truth\n- `work/options/`: the resolved option file of every run; `work/logs/`: their logs'),
                ('Step times', '| step | time |\n|---|---|\n' + timing)]
    report.write_markdown(files['markdown'], rows, 'perceive-ir demo: Perceive-IR vs the same backbone with L1 only',
                          notes, sections)
    summary = {'rows': rows, 'weights': labels, 'random_weights': [k for k, v in labels.items() if RANDOM_NOTE in v],
               'quick': cfg.quick, 'device': cfg.resolved_device(), 'timings': cfg.timings,
               'curves': curves, 'prompt_curve': prompt_curve or {}}
    with open(files['summary'], 'w', encoding='utf-8') as f:
        json.dump(_finite(summary), f, indent=2)
    return {'files': files, 'rows': rows, 'labels': labels}


def _finite(obj):
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def _count_images(cfg, opts, name):
    folder = os.path.join(cfg.work, 'results', opts['test_l1']['name'], 'visualization', name)
    return len([f for f in os.listdir(folder) if f.endswith('.png')]) if os.path.isdir(folder) else 0


def summary_text(cfg, result):
    """The short final summary printed by the CLI."""
    rows = result['rows']
    mean = rows[-1]
    lines = ['', 'perceive-ir demo finished', '=' * 25,
             report.markdown_table(rows), '',
             f"Mean PSNR: L1 only {mean['psnr_l1']:.2f} dB, Perceive-IR {mean['psnr_perceiveir']:.2f} dB "
             f"({mean['delta_psnr']:+.2f} dB).", '']
    for v in result['labels'].values():
        lines.append(('WARNING: ' if RANDOM_NOTE in v else '') + v)
    lines += ['', f"Total time: {sum(cfg.timings.values()):.0f} s", f"Report: {result['files']['markdown']}",
              f"Table: {result['files']['csv']}", f"Plots: {result['files']['losses']}, {result['files']['psnr']}",
              f"Strips: {os.path.dirname(result['files']['strips'][0]) if result['files']['strips'] else '-'}"]
    return '\n'.join(lines)


def run_demo(cfg):
    """Run every step; returns :func:`write_report`'s result."""
    check_weight_files(cfg)
    prepare_work_dir(cfg)
    steps = ['pack', 'medium restorers', 'render-medium', 'quality prompts', 'stage 2 (Perceive-IR, L1 only)',
             'test', 'report']
    overall = None
    if cfg.progress:
        from tqdm import tqdm
        overall = tqdm(total=len(steps), desc='demo', unit='step', dynamic_ncols=True)

    def done(step):
        if overall is not None:
            overall.set_postfix_str(step)
            overall.update(1)

    try:
        make_packs(cfg)
        done('packed')
        opts = build_options(cfg)
        medium = train_medium(cfg, opts)
        done('medium restorers')
        opts = build_options(cfg, {'medium': medium})
        render_triplets(cfg, opts, medium)
        done('render-medium')
        prompts, prompt_curve = train_prompts(cfg, opts)
        done('prompts')
        paths = {'medium': medium, 'prompts': prompts}
        opts = build_options(cfg, paths)
        paths['init_backbone'] = init_backbone(cfg, opts)
        opts = build_options(cfg, paths)
        weights, curves = train_stage2(cfg, opts)
        done('stage 2')
        paths['stage2'] = weights
        opts = build_options(cfg, paths)
        tested = test_models(cfg, opts)
        done('test')
        result = write_report(cfg, opts, tested, curves, prompt_curve)
        done('report')
    finally:
        if overall is not None:
            overall.close()
    return result
