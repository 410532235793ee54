"""Training-step cost of Perceive-IR vs the same backbone trained with L1 only (same batch).

Prints markdown tables (never asserts anything about speed):

1. one full optimisation step of ``PerceiveIRModel`` (L1 + L_cl + L_clip + L_dpl, k proxies,
   through the model's own ``feed_data`` / ``optimize_parameters``) and of
   ``ImageRestorationModel`` with the bare backbone and L1 only, on the same batch, and the ratio;
2. a breakdown timed part by part at the same shapes: backbone forward/backward, the
   wrapper's extra trainable work (CFE on both crops, FiLM), SGM (frozen DINOv2), the quality
   perceiver (frozen CLIP, forward + backward into the image), VGG-16 of L_dpl, the k proxies
   (frozen, no grad) and L_cl.

Weights are random (timing only): a random ViT-B/32 CLIP state dict is written to a temporary
file for the perceiver, DINOv2 and VGG-16 are random-initialised. Defaults: realistic
configurations on CUDA (256 crops, batch 2 per GPU as the official 3-task config, Restormer
dim 48 [4,6,6,8], ViT-B/32 CLIP, DINOv2 ViT-B/14, 3 proxies), small ones on CPU.

Examples::

    python bench/train_step.py --device cpu
    python bench/train_step.py --device cuda                       # official sizes, fp32
    python bench/train_step.py --device cuda --bf16                # train.autocast: bf16
    python bench/train_step.py --device cuda --backbone NAFNet --size 256 --batch 4
"""
import argparse
import copy
import datetime
import os
import platform
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from _common import BACKBONES, resolve_run_args, time_call, time_interleaved  # noqa: E402  (bench/ is on sys.path)
import perceive_ir_plugin  # noqa: E402,F401  (registers everything)
from basicsr.archs import build_network  # noqa: E402
from basicsr.losses import build_loss  # noqa: E402

SCALES = {
    'full': {
        'size': 256, 'batch': 2, 'proxies': 3, 'clip_model': 'ViT-B-32-quickgelu', 'sgm_config': 'dinov2_vitb14',
        # Proxies of the official 3-task config that exist as plugin archs: the stage-1 medium
        # Restormer, PromptIR (3-task) and a NAFNet in place of the third-party restorers.
        'proxy_nets': [
            dict(type='Restormer', dim=48, num_blocks=[4, 6, 6, 8], num_refinement_blocks=4, heads=[1, 2, 4, 8]),
            dict(type='PromptIR', dim=48, num_blocks=[4, 6, 6, 8], num_refinement_blocks=4, decoder=True),
            dict(type='NAFNet', width=32, middle_blk_num=1, enc_blk_nums=[1, 1, 1, 28], dec_blk_nums=[1, 1, 1, 1]),
        ],
    },
    'small': {
        'size': 64, 'batch': 2, 'proxies': 2, 'clip_model': 'perceive-ir-tiny-clip', 'sgm_config': 'tiny',
        'proxy_nets': [
            dict(type='Restormer', dim=8, num_blocks=[1, 1, 1, 1], num_refinement_blocks=1, heads=[1, 1, 2, 2]),
            dict(type='NAFNet', width=8, middle_blk_num=1, enc_blk_nums=[1, 1], dec_blk_nums=[1, 1]),
            dict(type='Restormer', dim=8, num_blocks=[1, 1, 1, 1], num_refinement_blocks=1, heads=[1, 1, 2, 2]),
        ],
    },
}


def random_clip_file(model_name, folder):
    """A random open_clip state dict for ``model_name`` (None for the tiny config, which needs none)."""
    if model_name == 'perceive-ir-tiny-clip':
        return None
    import open_clip
    model = open_clip.create_model(model_name, pretrained=None)
    path = os.path.join(folder, f'{model_name}-random.pt')
    torch.save(model.state_dict(), path)
    return path


def proxy_files(scale_cfg, k, folder):
    """Random weights of the first ``k`` proxy networks, saved as BasicSR files."""
    out = []
    for i, net_opt in enumerate(scale_cfg['proxy_nets'][:k]):
        torch.manual_seed(100 + i)
        path = os.path.join(folder, f'proxy{i}.pth')
        torch.save({'params': build_network(dict(net_opt)).state_dict()}, path)
        out.append((dict(net_opt), path))
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--device', default='cpu', help='cpu | cuda | cuda:N')
    parser.add_argument('--backbone', default='Restormer', choices=sorted(BACKBONES['full']))
    parser.add_argument('--scale', default=None, choices=('full', 'small'),
                        help='network sizes (default: full on CUDA, small on CPU)')
    parser.add_argument('--size', type=int, default=None, help='crop size (default 256 full / 64 small)')
    parser.add_argument('--batch', type=int, default=None, help='batch size (default 2)')
    parser.add_argument('--proxies', type=int, default=None, help='number of proxies k (default 3 full / 2 small)')
    parser.add_argument('--bf16', action='store_true', help='train.autocast: bf16 (CUDA only)')
    parser.add_argument('--repeats', type=int, default=None, help='timed steps (default 20 GPU / 3 CPU)')
    parser.add_argument('--warmup', type=int, default=None, help='untimed steps first (default 5 GPU / 1 CPU)')
    parser.add_argument('--threads', type=int, default=None, help='torch CPU threads')
    args = parser.parse_args(argv)

    device, scale, repeats, warmup = resolve_run_args(parser, args)
    scfg = SCALES[scale]
    size = args.size or scfg['size']
    batch = args.batch or scfg['batch']
    k = scfg['proxies'] if args.proxies is None else args.proxies
    if k > len(scfg['proxy_nets']):
        parser.error(f'--proxies at most {len(scfg["proxy_nets"])}')
    backbone_opt = dict(BACKBONES[scale][args.backbone])
    autocast = 'bf16' if args.bf16 else None

    with tempfile.TemporaryDirectory() as tmp:
        from perceive_ir_plugin.data.demo_data import make_demo_packs
        dataroot = os.path.join(tmp, 'packs')  # real crops for the DPL probe (run once, before timing)
        make_demo_packs(dataroot, splits=('train', ), max_side=max(2 * size, 96),
                        train_images=('astronaut', 'rocket'))
        clip_file = random_clip_file(scfg['clip_model'], tmp)
        proxies = proxy_files(scfg, k, tmp)
        batch_data = make_batch(batch, size, device)
        results = {}

        # ---------------------------------------------------------------- full steps
        torch.manual_seed(0)
        l1_model = build_model(l1_options(backbone_opt, device, autocast))
        torch.manual_seed(0)
        pir_opt = perceiveir_options(backbone_opt, scfg, clip_file, proxies, device, autocast, dataroot, size)
        pir_model = build_model(pir_opt)
        step(pir_model, batch_data)  # the first step also runs the DPL probe (once per epoch): not timed
        results['l1_step'], results['pir_step'] = time_interleaved(
            [lambda: step(l1_model, batch_data), lambda: step(pir_model, batch_data)], device, warmup, repeats)
        log = {k_: float(v) for k_, v in getattr(pir_model, 'log_dict', {}).items()}
        del pir_model, l1_model

        # ---------------------------------------------------------------- breakdown
        parts = breakdown(backbone_opt, pir_opt, batch_data, device, warmup, repeats, args.bf16)

    print(f'# bench/train_step.py — {datetime.date.today().isoformat()}\n')
    print(f'- device: {_device_name(device)}; torch {torch.__version__}; threads {torch.get_num_threads()}')
    print(f'- backbone {args.backbone} ({scale}: '
          f'{", ".join(f"{k_}={v}" for k_, v in backbone_opt.items() if k_ != "type")}); batch {batch} x '
          f'{size}x{size}; k = {k} proxies ({", ".join(p[0]["type"] for p in proxies)}); CLIP {scfg["clip_model"]}; '
          f'DINOv2 config {scfg["sgm_config"]}; autocast {autocast or "off"}; median of {repeats} steps after '
          f'{warmup} warm-up; random weights')
    if log:
        print(f'- Perceive-IR loss terms of the last step: {", ".join(f"{k_}={v:.4g}" for k_, v in log.items())}')
    print('\n| training step | ms / step | ratio |')
    print('|---|---:|---:|')
    print(f"| {args.backbone}, L1 only (ImageRestorationModel) | {results['l1_step']:.1f} | 1.00x |")
    print(f"| {args.backbone} + Perceive-IR (PerceiveIRModel, all losses, k={k}) | {results['pir_step']:.1f} | "
          f"{results['pir_step'] / results['l1_step']:.2f}x |")
    print('\nBreakdown (each part timed alone at the same shapes; fwd = forward, bwd = backward):\n')
    print('| part | ms | share of the Perceive-IR step |')
    print('|---|---:|---:|')
    for name, ms in parts:
        print(f"| {name} | {ms:.1f} | {100 * ms / results['pir_step']:.0f}% |")
    print(f"| *sum of the parts* | {sum(ms for _, ms in parts):.1f} | "
          f"{100 * sum(ms for _, ms in parts) / results['pir_step']:.0f}% |")
    return 0


def _device_name(device):
    if device.type == 'cuda':
        return torch.cuda.get_device_name(device)
    return f'CPU {platform.processor() or platform.machine()} ({os.cpu_count()} cores)'


# ------------------------------------------------------------------------------------------------
# models
# ------------------------------------------------------------------------------------------------
def make_batch(batch, size, device):
    """A synthetic all-in-one batch (tasks cycling over the five; no pending noise)."""
    g = torch.Generator().manual_seed(0)
    tasks = torch.arange(batch) % 5
    from perceive_ir_plugin.data.tasks import TASKS
    return {'lq': torch.rand(batch, 3, size, size, generator=g), 'gt': torch.rand(batch, 3, size, size, generator=g),
            'lq_pos': torch.rand(batch, 3, size, size, generator=g), 'task': tasks,
            'task_name': [TASKS[int(t)] for t in tasks], 'lq_path': [f'bench/{i}' for i in range(batch)],
            'key': [f'bench/{i}' for i in range(batch)]}


def _common(device, autocast):
    return {'name': 'bench', 'model_type': 'ImageRestorationModel', 'scale': 1, 'is_train': True, 'dist': False,
            'rank': 0, 'world_size': 1, 'num_gpu': 1 if device.type == 'cuda' else 0, 'manual_seed': 0,
            'path': {'pretrain_network_g': None, 'strict_load_g': True, 'resume_state': None,
                     'experiments_root': tempfile.gettempdir(), 'models': tempfile.gettempdir(),
                     'training_states': tempfile.gettempdir(), 'log': tempfile.gettempdir(),
                     'visualization': tempfile.gettempdir()},
            'train': {'total_iter': 1000, 'warmup_iter': -1, 'autocast': autocast,
                      'optim_g': {'type': 'AdamW', 'lr': 2e-4, 'weight_decay': 1e-4, 'betas': [0.9, 0.999]},
                      'scheduler': {'type': 'TrueCosineAnnealingLR', 'T_max': 1000, 'eta_min': 1e-6},
                      'pixel_opt': {'type': 'L1Loss', 'loss_weight': 1.0, 'reduction': 'mean'}},
            'datasets': {}, 'val': None, 'logger': {'print_freq': 100, 'save_checkpoint_freq': 1000}}


def l1_options(backbone_opt, device, autocast):
    """ImageRestorationModel options: the bare backbone with L1 only."""
    opt = _common(device, autocast)
    opt['network_g'] = dict(backbone_opt)
    return opt


def perceiveir_options(backbone_opt, scfg, clip_file, proxies, device, autocast, dataroot, size):
    """PerceiveIRModel options: the backbone in the Perceive-IR wrapper, all four losses, k proxies."""
    from perceive_ir_plugin.demo.stage2 import perceiveir_model_options
    opt = _common(device, autocast)
    return perceiveir_model_options(opt, backbone_opt, sgm_config=scfg['sgm_config'], clip_model=scfg['clip_model'],
                                    clip_weights=clip_file, proxies=proxies, dataroot=dataroot, probe_crop=size)


def build_model(opt):
    from basicsr.models import build_model as _build
    return _build(copy.deepcopy(opt))


def step(model, batch_data):
    model.feed_data(batch_data)
    model.optimize_parameters(1)


def breakdown(backbone_opt, pir_opt, batch_data, device, warmup, repeats, bf16):
    """Each part alone at the step's shapes; returns ``[(name, ms)]``."""
    from perceive_ir_plugin.demo.stage2 import build_parts
    parts = build_parts(pir_opt, device)
    data = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch_data.items()}
    lq, gt, lq_pos, task = data['lq'], data['gt'], data['lq_pos'], data['task']
    ac = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16 and device.type == 'cuda')

    def timed(fn):
        return time_call(fn, device, warmup, repeats)

    torch.manual_seed(0)
    backbone = build_network(dict(backbone_opt)).to(device).train()

    def run_backbone():
        with ac:
            loss = (backbone(lq).float() - gt).abs().mean()
        loss.backward()

    wrapper = parts['wrapper'].train()

    def run_wrapper():
        with ac:
            out, aux = wrapper(lq, x_pos=lq_pos, return_aux=True)
            loss = (out.float() - gt).abs().mean() + aux['z'].float().sum() * 0 + aux['z_pos'].float().sum() * 0
        loss.backward()

    cfe = parts['cfe']

    def run_cfe():
        with ac:
            z = cfe(torch.cat([lq, lq_pos]))
        z.float().sum().backward()

    sgm = parts['sgm']

    def run_sgm():
        with torch.no_grad(), ac:
            sgm(lq)

    t_backbone, t_wrapper, t_cfe, t_sgm = time_interleaved([run_backbone, run_wrapper, run_cfe, run_sgm], device,
                                                           warmup, repeats)
    out = [('backbone fwd+bwd (L1)', t_backbone),
           ('SGM: frozen DINOv2 fwd (no grad)', t_sgm),
           ('CFE fwd+bwd (LQ + second crop)', t_cfe),
           ('FiLM/PGM + hooks (wrapper fwd+bwd − backbone − SGM − CFE)', t_wrapper - t_backbone - t_sgm - t_cfe)]

    clip_loss = parts['clip_loss']
    restored = gt.clone().requires_grad_(True)

    def run_clip():
        with ac:
            loss = clip_loss(restored)
        loss.backward()
    out.append(('perceiver: frozen CLIP fwd+bwd into the image (L_clip)', timed(run_clip)))

    bank = parts['proxy_bank']
    k = len(bank) if bank is not None else 0
    proxy_out, mask = (bank(data, lq) if bank is not None else (None, None))
    dpl = parts['dpl_loss']

    def run_vgg():
        with ac:
            loss = dpl(restored, gt, lq, proxy_out, mask)
        loss.backward()
    out.append((f'VGG-16 (L_dpl: R fwd+bwd, GT/LQ/{k} proxies fwd)', timed(run_vgg)))

    def run_proxies():
        with torch.no_grad():
            bank(data, lq)
    if bank is not None:
        out.append((f'proxies: {k} frozen restorers fwd (no grad, ProxyBank)', timed(run_proxies)))

    cl = build_loss({'type': 'DegradationContrastiveLoss', 'loss_weight': 0.1}).to(device)
    za = torch.nn.functional.normalize(torch.randn(lq.shape[0], 128, device=device), dim=1).requires_grad_(True)
    zp = torch.nn.functional.normalize(torch.randn(lq.shape[0], 128, device=device), dim=1)

    def run_cl():
        cl(za, zp, task).backward()
    out.append(('L_cl (InfoNCE)', timed(run_cl)))
    return out


if __name__ == '__main__':
    sys.exit(main())
