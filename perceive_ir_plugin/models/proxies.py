"""Frozen proxy restorers: the medium-quality negatives of the difficulty-adaptive perceptual loss (SPEC §4.3).

Each proxy is either

* a live network: any registered arch (``network: {type: ..., ...}``) with a checkpoint
  read through :mod:`perceive_ir_plugin.utils.checkpoint` (BasicSR, Lightning — e.g. the
  official PromptIR 3-task ``model.ckpt`` —, Perceive-IR release or plain files), or one
  checkpoint per fold (``fold_checkpoints``: the stage-1 cross-fitted medium restorers,
  each sample is restored by the model of its own held-out fold); it runs frozen, without
  gradients, in eval mode and, on CUDA, under bf16 autocast; or
* a precomputed pack (``pack``): ``<pack>/<task>.lmdb`` holds the proxy's output for every
  training image under the training pack's LMDB key, at the degraded image's size; the
  sample's crop box (``crop`` in the batch) is applied to it. Not possible for denoising,
  whose noise is drawn on the fly.

Each proxy is valid for a list of tasks (``tasks``, default all): m_k = 0 elsewhere, and
the proxy is not even run on those samples.
"""
import copy
import os

import torch

from basicsr.utils import get_root_logger
from basicsr.utils.registry import ARCH_REGISTRY
from perceive_ir_plugin.archs.arch_util import pad_to_multiple
from perceive_ir_plugin.data.tasks import TASKS, check_task
from perceive_ir_plugin.utils.checkpoint import load_checkpoint_into

PRECISIONS = {'bf16': torch.bfloat16, 'fp16': torch.float16, 'fp32': None}
PROXY_KEYS = ('name', 'tasks', 'network', 'checkpoint', 'fold_checkpoints', 'n_folds', 'param_key', 'strict',
              'pack', 'precision', 'size_multiple', 'pad_mode')


def psnr_per_sample(img, ref):
    """PSNR (dB) of each sample of two (B, C, H, W) batches in [0, 1] (both clamped; MSE floored at 1e-10).

    Returns:
        Tensor: (B,) float32.
    """
    mse = (img.float().clamp(0, 1) - ref.float().clamp(0, 1)).pow(2).flatten(1).mean(dim=1)
    return 10.0 * torch.log10(1.0 / mse.clamp(min=1e-10))


def _freeze(net):
    net.requires_grad_(False)
    net.eval()
    return net


class _Proxy:
    """One proxy (see the module docstring for the options)."""

    def __init__(self, opt, index, trust=False):
        where = f'train.proxies[{index}]'
        unknown = sorted(set(opt) - set(PROXY_KEYS))
        if unknown:
            raise ValueError(f'{where}: unknown option(s) {unknown}; allowed: {list(PROXY_KEYS)}.')
        self.name = str(opt.get('name') or f'proxy{index}')
        self.where = f"{where} ('{self.name}')"
        tasks = opt.get('tasks') or 'all'
        tasks = list(TASKS) if tasks == 'all' else [check_task(t, f'{where}.tasks') for t in tasks]
        self.task_ids = sorted(TASKS.index(t) for t in tasks)
        precision = opt.get('precision', 'bf16')
        if precision not in PRECISIONS:
            raise ValueError(f"{self.where}.precision must be one of {list(PRECISIONS)}, got '{precision}'.")
        self.dtype = PRECISIONS[precision]
        self.pad_mode = opt.get('pad_mode', 'reflect')
        self.nets, self.pack, self.readers = [], None, {}
        sources = [k for k in ('checkpoint', 'fold_checkpoints', 'pack') if opt.get(k)]
        if len(sources) != 1:
            raise ValueError(f"{self.where}: give exactly one of 'checkpoint', 'fold_checkpoints' or 'pack' "
                             f'(got {sources or "none"}).')
        if opt.get('pack'):
            if TASKS.index('denoise') in self.task_ids:
                raise ValueError(f"{self.where}: a precomputed pack cannot serve 'denoise' (its noise is drawn on "
                                 'the fly); run that proxy live (checkpoint / fold_checkpoints) instead.')
            self.pack = str(opt['pack'])
            for t in self.task_ids:
                path = os.path.join(self.pack, f'{TASKS[t]}.lmdb')
                if not os.path.isdir(path):
                    raise FileNotFoundError(f"{self.where}.pack: '{path}' does not exist (expected "
                                            '<pack>/<task>.lmdb with the proxy outputs under the training keys).')
            self.size_multiple = 1
            return
        if not isinstance(opt.get('network'), dict) or 'type' not in opt['network']:
            raise ValueError(f"{self.where}: option 'network' ({{type: <registered arch>, ...}}) is required for a "
                             'live proxy.')
        paths = [opt['checkpoint']] if opt.get('checkpoint') else list(opt['fold_checkpoints'])
        self.n_folds = int(opt.get('n_folds', len(paths))) if opt.get('fold_checkpoints') else None
        if self.n_folds is not None and self.n_folds != len(paths):
            raise ValueError(f'{self.where}: {len(paths)} fold_checkpoints for n_folds={self.n_folds}.')
        key = 'checkpoint' if opt.get('checkpoint') else 'fold_checkpoints'
        for k, path in enumerate(paths):
            net_opt = copy.deepcopy(opt['network'])
            net = ARCH_REGISTRY.get(net_opt.pop('type'))(**net_opt)
            option_key = f'{where}.{key}' + ('' if key == 'checkpoint' else f'[{k}]')
            load_checkpoint_into(net, path, param_key=opt.get('param_key'), strict=opt.get('strict', True),
                                 trust=trust, option_key=option_key)
            self.nets.append(_freeze(net))
        self.size_multiple = int(opt.get('size_multiple') or getattr(self.nets[0], 'size_multiple', 1) or 1)

    def to(self, device):
        self.nets = [net.to(device) for net in self.nets]
        return self

    def _run_net(self, net, lq):
        x, (h, w) = pad_to_multiple(lq, self.size_multiple, self.pad_mode)
        use_amp = self.dtype is not None and lq.device.type == 'cuda'
        with torch.no_grad(), torch.autocast(device_type=lq.device.type, dtype=self.dtype or torch.float32,
                                             enabled=use_amp):
            out = net(x)
        return out[..., :h, :w].float().clamp_(0, 1)

    def _reader(self, task):
        if task not in self.readers:
            from perceive_ir_plugin.data.lmdb_io import LmdbImageReader
            self.readers[task] = LmdbImageReader(os.path.join(self.pack, f'{task}.lmdb'), task=task)
        return self.readers[task]

    def _read_pack(self, data, index, size):
        from perceive_ir_plugin.data.all_in_one_dataset import apply_box, to_tensor, upscale_to_min_side
        if 'crop' not in data or 'key' not in data:
            raise KeyError(f"{self.where}: a pack proxy needs the batch fields 'key' and 'crop' (AllInOneDataset).")
        outs = []
        for i in index.tolist():
            task, key = data['key'][i].split('/', 1)
            img = self._reader(task).read(key)
            box = [int(v) for v in data['crop'][i].tolist()]
            img = upscale_to_min_side([img], size)[0][0]
            crop = apply_box(img, box, size)
            if crop.shape[:2] != (size, size):
                raise ValueError(f"{self.where}: pack image '{task}/{key}' gives a {crop.shape[1]}x{crop.shape[0]} "
                                 f'crop, expected {size}x{size} (does the pack match the training images?).')
            outs.append(to_tensor(crop))
        return torch.stack(outs).to(data['lq'].device)

    def __call__(self, data, lq, task):
        """Outputs for the valid samples.

        Returns:
            tuple[Tensor, Tensor]: (B, 3, H, W) outputs (zeros where invalid) and the (B,) mask.
        """
        mask = torch.zeros(lq.shape[0], dtype=torch.bool, device=lq.device)
        for t in self.task_ids:
            mask |= task == t
        out = torch.zeros_like(lq, dtype=torch.float32)
        index = mask.nonzero().flatten()
        if index.numel() == 0:
            return out, mask
        if self.pack is not None:
            out[index] = self._read_pack(data, index, lq.shape[-1])
        elif self.n_folds is None:
            out[index] = self._run_net(self.nets[0], lq[index])
        else:
            from perceive_ir_plugin.data.folds import fold_of
            folds = torch.tensor([fold_of(*data['key'][i].split('/', 1), n_folds=self.n_folds)
                                  for i in index.tolist()], device=lq.device)
            for fold, net in enumerate(self.nets):
                sub = index[folds == fold]
                if sub.numel():
                    out[sub] = self._run_net(net, lq[sub])
        return out, mask


class ProxyBank:
    """The list of frozen proxies of ``train.proxies``.

    Proxies are not ``nn.Module`` children of anything the model saves or wraps for DDP.

    Args:
        proxy_opts (list[dict]): One dict per proxy: ``name``; ``tasks`` (list or ``all``);
            ``network`` + ``checkpoint`` (live), ``network`` + ``fold_checkpoints`` (+ ``n_folds``)
            (live, per-fold), or ``pack`` (precomputed); ``param_key``, ``strict`` (loading);
            ``precision`` (``bf16`` default, ``fp16``, ``fp32``; CUDA only);
            ``size_multiple`` / ``pad_mode`` (padding of live inputs; default: the arch's
            ``size_multiple``, reflect).
        trust (bool): Allow pickled extras in checkpoints (``trust_checkpoint``).
    """

    def __init__(self, proxy_opts, trust=False):
        if not isinstance(proxy_opts, (list, tuple)):
            raise ValueError(f'train.proxies must be a list of proxy options, got {type(proxy_opts).__name__}.')
        self.proxies = [_Proxy(dict(opt), i, trust) for i, opt in enumerate(proxy_opts)]
        names = [p.name for p in self.proxies]
        if len(set(names)) != len(names):
            raise ValueError(f'train.proxies: names must be unique, got {names}.')
        if self.proxies:
            get_root_logger().info('DPL proxies: ' + ', '.join(
                f"{p.name} ({'pack' if p.pack else f'{len(p.nets)} net(s)'}; tasks "
                f"{[TASKS[t] for t in p.task_ids]})" for p in self.proxies))

    def __len__(self):
        return len(self.proxies)

    @property
    def names(self):
        return [p.name for p in self.proxies]

    def to(self, device):
        for p in self.proxies:
            p.to(device)
        return self

    def __call__(self, data, lq):
        """Run every proxy on a batch.

        Args:
            data (dict): The batch (``task`` (B,) int64; ``key``/``crop`` for packs and folds).
            lq (Tensor): (B, 3, H, W) degraded input on the model's device (noise already added).

        Returns:
            tuple[Tensor, Tensor]: (B, K, 3, H, W) outputs in [0, 1] and (B, K) float mask m_k.
        """
        if 'task' not in data:
            raise KeyError("DPL proxies need the batch field 'task' (task ids, from AllInOneDataset).")
        task = torch.as_tensor(data['task'], device=lq.device).reshape(-1)
        outs, masks = zip(*(p(data, lq, task) for p in self.proxies))
        return torch.stack(outs, dim=1), torch.stack(masks, dim=1).float()
