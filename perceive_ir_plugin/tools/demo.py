"""``perceive-ir demo``: the whole Perceive-IR pipeline on embedded real photographs, on the CPU.

Packs the stand-in data (scikit-image photographs degraded per task) → trains the two
cross-fitted medium restorers and the quality prompts (stage 1) → renders the medium tier →
trains Perceive-IR stage 2 on a small backbone and, side by side, the same backbone with L1
only (same data, iterations, seed and initial weights) → runs BasicSR's test pipeline on
both → writes ``<out>/results.md`` / ``results.csv`` (per-task PSNR/SSIM), ``losses.png``,
``psnr_per_task.png`` and ``strips/*.png`` (degraded | L1 only | Perceive-IR | ground truth).

CLIP, DINOv2 and VGG-16 are random-initialised unless local weight files are given with
``--clip-weights`` / ``--dino-weights`` / ``--vgg-weights``; the summary and the report say so.
"""
import os
import sys


def run(args):
    """Entry of ``perceive-ir demo``; returns the exit code."""
    os.environ.setdefault('HF_HUB_OFFLINE', '1')
    import torch

    import perceive_ir_plugin  # noqa: F401  (registers the plugin's classes)
    if args.threads:
        torch.set_num_threads(args.threads)
    from perceive_ir_plugin.demo.pipeline import DemoConfig, run_demo, summary_text
    cfg = DemoConfig(out=args.out, device=args.device, quick=args.quick, clip_weights=args.clip_weights,
                     dino_weights=args.dino_weights, vgg_weights=args.vgg_weights, seed=args.seed,
                     progress=not args.no_progress)
    try:
        result = run_demo(cfg)
    except (FileNotFoundError, FileExistsError, ValueError, RuntimeError) as err:
        print(f'error: {err}', file=sys.stderr)
        return 1
    print(summary_text(cfg, result))
    return 0


def add_parser(subparsers):
    """Add the ``demo`` sub-command."""
    parser = subparsers.add_parser(
        'demo', help='end-to-end demo on embedded photographs: stage 1, Perceive-IR vs L1 only, report',
        description=__doc__.split('\n\n')[0] + ' Runs in about 15 minutes on 2 CPU cores (--quick: about a minute).')
    parser.add_argument('--out', default=os.path.join('results', 'demo'),
                        help='report folder (default results/demo; work files in <out>/work)')
    parser.add_argument('--device', default='auto', choices=('auto', 'cpu', 'cuda'),
                        help='where to train and test (default auto: CUDA when available)')
    parser.add_argument('--clip-weights', default=None, metavar='FILE',
                        help="OpenAI CLIP ViT-B-32.pt (or an open_clip ViT-B-32-quickgelu state dict); "
                        'default: a tiny random CLIP')
    parser.add_argument('--dino-weights', default=None, metavar='FILE',
                        help='DINOv2 ViT-B/14 weights (facebook/dinov2-base safetensors or dinov2_vitb14 .pth); '
                        'default: a tiny random ViT')
    parser.add_argument('--vgg-weights', default=None, metavar='FILE',
                        help='torchvision vgg16-397923af.pth; default: random VGG-16')
    parser.add_argument('--quick', action='store_true', help='tiny sizes and a few iterations (smoke test)')
    parser.add_argument('--seed', type=int, default=0, help='seed of both stage-2 runs (default 0)')
    parser.add_argument('--threads', type=int, default=None,
                        help="torch CPU threads (default: torch's choice; 1 helps on a busy machine)")
    parser.add_argument('--no-progress', action='store_true', help='no progress bars')
    parser.set_defaults(func=run)
