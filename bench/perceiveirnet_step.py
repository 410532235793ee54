"""PerceiveIRNet training step (fp32 vs bf16 autocast) and proxy restorers in reduced precision.

Prints markdown tables; asserts nothing about speed. Weights are random (timing and numerics
only): DINOv2 and VGG-16 random-initialised, the proxy a random PromptIR written to a
temporary Lightning-style checkpoint and read back through the plugin's loader.

1. one optimisation step of the release network (dim 48, [4,6,6,8], DINOv2 ViT-B/14 SGM, CFE,
   PGMs) with L1 + 0.1 L_cl + 0.1 L_dpl (two proxy negatives), AdamW 2e-4 / wd 1e-4, in fp32
   and under ``torch.autocast(bfloat16)``: ms/step, peak memory, loss finiteness;
2. a :class:`~perceive_ir_plugin.models.proxies.ProxyBank` proxy in fp32 and bf16: ms/batch and
   the largest output difference.

Usage::

    python bench/perceiveirnet_step.py --device cuda          # 256 crops, batch 2 (release per GPU)
    python bench/perceiveirnet_step.py --device cpu           # tiny configuration, smoke run
"""
import argparse
import os
import tempfile
import time

import torch

import perceive_ir_plugin  # noqa: F401  (registers everything)
from basicsr.archs import build_network
from basicsr.losses import build_loss
from perceive_ir_plugin.archs.perceiveir_arch import count_trainable_parameters
from perceive_ir_plugin.models.proxies import ProxyBank

TINY = dict(dim=8, num_blocks=[1, 1, 1, 1], num_refinement_blocks=1, heads=[1, 1, 1, 1], sgm_config='tiny')
TINY_PROXY = dict(type='Restormer', dim=8, num_blocks=[1, 1, 1, 1], num_refinement_blocks=1, heads=[1, 1, 1, 1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--size', type=int, default=None, help='crop size (256 on CUDA, 32 on CPU)')
    parser.add_argument('--batch', type=int, default=2)
    parser.add_argument('--steps', type=int, default=None, help='timed steps (10 on CUDA, 2 on CPU)')
    args = parser.parse_args()
    dev = torch.device(args.device)
    cuda = dev.type == 'cuda'
    size = args.size or (256 if cuda else 32)
    steps = args.steps or (10 if cuda else 2)

    def sync():
        if cuda:
            torch.cuda.synchronize(dev)

    net = build_network(dict(type='PerceiveIRNet', sgm_allow_random=True, **({} if cuda else TINY))).to(dev)
    dpl = build_loss(dict(type='DifficultyAdaptivePerceptualLoss', allow_random_vgg=True, loss_weight=0.1)).to(dev)
    cl = build_loss(dict(type='DegradationContrastiveLoss', loss_weight=0.1))
    optimizer = torch.optim.AdamW(net.parameters(), 2e-4, weight_decay=1e-4)
    gen = torch.Generator(device='cpu').manual_seed(0)
    x, gt, x_pos = (torch.rand(args.batch, 3, size, size, generator=gen).to(dev) for _ in range(3))
    proxies = torch.rand(args.batch, 2, 3, size, size, generator=gen).to(dev)
    task = (torch.arange(args.batch) % 3).to(dev)
    name = torch.cuda.get_device_name(dev) if cuda else 'CPU'
    print(f'\n{name}, torch {torch.__version__}, crop {size}, batch {args.batch}, '
          f'{count_trainable_parameters(net) / 1e6:.2f} M trainable\n')
    print('| step | ms/step | loss | peak GiB | finite |\n|---|---|---|---|---|')
    for mode in ('fp32', 'bf16'):
        if cuda:
            torch.cuda.reset_peak_memory_stats(dev)
        for i in range(steps + 3):
            if i == 3:
                sync()
                start = time.time()
            with torch.autocast(dev.type, torch.bfloat16, enabled=mode == 'bf16'):
                out, aux = net(x, x_pos, return_aux=True)
                loss = (out - gt).abs().mean() + cl(aux['z'], aux['z_pos'], task) + dpl(out, gt, x, proxies)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        sync()
        peak = torch.cuda.max_memory_allocated(dev) / 2**30 if cuda else float('nan')
        print(f'| PerceiveIRNet {mode} | {(time.time() - start) / steps * 1e3:.1f} | {float(loss.detach()):.4f} | '
              f'{peak:.2f} | {bool(torch.isfinite(loss))} |')

    proxy_net = dict(type='PromptIR', decoder=True) if cuda else dict(TINY_PROXY)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = os.path.join(tmp, 'model.ckpt')
        weights = build_network(dict(proxy_net)).state_dict()
        torch.save({'state_dict': {f'net.{k}': v for k, v in weights.items()}, 'epoch': 0}, ckpt)
        print(f'\n| proxy {proxy_net["type"]} | ms/batch | output dtype | requires grad |\n|---|---|---|---|')
        outputs = {}
        for precision in ('fp32', 'bf16'):
            bank = ProxyBank([{'name': 'p', 'network': dict(proxy_net), 'checkpoint': ckpt,
                               'precision': precision}]).to(dev)
            bank({'task': task}, x)
            sync()
            start = time.time()
            for _ in range(steps):
                out, _ = bank({'task': task}, x)
            sync()
            outputs[precision] = out
            print(f'| {precision} | {(time.time() - start) / steps * 1e3:.1f} | {out.dtype} | {out.requires_grad} |')
    diff = float((outputs['bf16'] - outputs['fp32']).abs().max())
    print(f'\nproxy bf16 vs fp32: max |difference| {diff:.4g} (0 on CPU, where proxies stay fp32)')


if __name__ == '__main__':
    main()
