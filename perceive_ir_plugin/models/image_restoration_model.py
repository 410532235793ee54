"""Image restoration model: BasicSR's ``SRModel`` plus what Restormer/NAFNet/PromptIR need.

The class follows BasicSR 1.4.2's model contract (``feed_data(data)``,
``optimize_parameters(current_iter)``, ``test()``, ``validation(...)``,
``save(epoch, current_iter)``, ``resume_training(state)``) so ``train_pipeline`` and
``test_pipeline`` drive it unchanged. Subclasses extend the small hooks below instead of
copying code:

* :meth:`feed_data` -- moves every tensor of the batch to the device (``self.data``
  keeps the whole dict), adds pending synthetic noise, applies progressive patches;
* :meth:`net_forward` -- the single place where a network is called;
* :meth:`compute_losses` -- returns ``(l_total, loss_dict)``;
* :meth:`trainable_parameters` -- what the optimizer updates and gradients are clipped on;
* :meth:`extra_training_state` / :meth:`load_extra_training_state` -- extra resumable state.
"""
import bisect
import os
import random
import time
from collections import OrderedDict
from contextlib import nullcontext

import torch
from torch.nn.parallel import DataParallel, DistributedDataParallel

from basicsr.archs import build_network
from basicsr.losses import build_loss
from basicsr.models.lr_scheduler import CosineAnnealingRestartLR, MultiStepRestartLR
from basicsr.models.sr_model import SRModel
from basicsr.utils import get_root_logger
from basicsr.utils.dist_util import master_only
from basicsr.utils.registry import MODEL_REGISTRY

from perceive_ir_plugin.models.lr_scheduler import (CosineAnnealingRestartCyclicLR, LinearWarmupCosineAnnealingLR,
                                                    TrueCosineAnnealingLR)
from perceive_ir_plugin.utils.atomic_io import atomic_torch_save
from perceive_ir_plugin.utils.checkpoint import (CheckpointError, compare_state_dicts, extract_state_dict,
                                                 format_mismatch, load_checkpoint_file, strip_prefix)
from perceive_ir_plugin.utils.tiling import tiled_forward

OPTIMIZERS = {'Adam': torch.optim.Adam, 'AdamW': torch.optim.AdamW, 'SGD': torch.optim.SGD}
SCHEDULERS = {
    'MultiStepLR': MultiStepRestartLR,
    'MultiStepRestartLR': MultiStepRestartLR,
    'CosineAnnealingRestartLR': CosineAnnealingRestartLR,
    'CosineAnnealingRestartCyclicLR': CosineAnnealingRestartCyclicLR,
    'TrueCosineAnnealingLR': TrueCosineAnnealingLR,
    'CosineAnnealingLR': TrueCosineAnnealingLR,
    'LinearWarmupCosineAnnealingLR': LinearWarmupCosineAnnealingLR,
}
AUTOCAST_DTYPES = {'bf16': torch.bfloat16, 'bfloat16': torch.bfloat16, 'fp16': torch.float16,
                   'float16': torch.float16}
PROGRESSIVE_KEYS = ('iters', 'mini_batch_sizes', 'gt_sizes')
SAVE_RETRIES = 3
SAVE_RETRY_DELAY = 1.0  # seconds between attempts of a failed checkpoint write


@MODEL_REGISTRY.register()
class ImageRestorationModel(SRModel):
    """Single-network image restoration (Restormer, NAFNet, PromptIR and subclasses).

    Options beyond ``SRModel``'s (all optional):

    * top level ``trust_checkpoint`` (bool, default false): allow pickled objects in
      ``path.pretrain_network_g`` (never needed for BasicSR/Lightning weight files);
    * ``path.param_key_g`` (or the forks' ``path.param_key``): top-level key of the
      weights file; missing keys fall back to ``params``, then to auto-detection
      (``params``, ``params_ema``, ``state_dict`` with a ``net.`` prefix, plain...);
    * ``train.optim_g.type``: ``Adam``, ``AdamW`` or ``SGD``;
    * ``train.scheduler.type``: ``MultiStepLR``/``MultiStepRestartLR``,
      ``CosineAnnealingRestartLR``, ``CosineAnnealingRestartCyclicLR``,
      ``TrueCosineAnnealingLR``/``CosineAnnealingLR``, ``LinearWarmupCosineAnnealingLR``;
    * ``train.autocast``: ``bf16`` or ``fp16`` mixed precision (CUDA only; ignored with a
      warning on CPU; fp16 uses a gradient scaler that is saved with the training state);
    * ``train.use_grad_clip`` (default false) and ``train.grad_clip_norm`` (default 0.01,
      the forks' value): clip the global gradient norm of :meth:`trainable_parameters`;
    * ``train.max_nonfinite_steps`` (default 10; null = never stop): a step whose loss
      (or clipped gradient norm) is NaN/Inf is skipped and logged; training stops with an
      error after this many in a row;
    * ``train.progressive: {iters, mini_batch_sizes, gt_sizes}`` (or the same keys in
      ``datasets.train``, Restormer's layout): progressive patch/batch sizes;
    * ``train.mixing_augs: {mixup, mixup_beta, use_identity}``: Restormer's mixup;
    * ``val.size_multiple`` (or ``val.window_size``; default: the network's
      ``size_multiple`` attribute, else 1), ``val.pad_mode`` (``reflect``|``replicate``,
      default reflect), ``val.tile: {size, overlap}``: padded / tiled testing;
    * ``val.suffix`` may be omitted in test mode.
    """

    def __init__(self, opt):
        self._normalize_options(opt)
        self.current_iter = 0
        self._validating = False
        self._warned_autocast = False
        super().__init__(opt)

    # ------------------------------------------------------------------ set-up
    @staticmethod
    def _normalize_options(opt):
        """Accept the forks' option spellings and fix BasicSR's test-mode quirks in place."""
        if opt.get('num_gpu') == 'auto':
            opt['num_gpu'] = torch.cuda.device_count()
        if opt.get('num_gpu', 0) != 0 and not torch.cuda.is_available():
            raise RuntimeError(f"Option num_gpu is {opt['num_gpu']} but CUDA is not available: set num_gpu: 0 "
                               '(CPU) or num_gpu: auto.')
        path_opt = opt.setdefault('path', {})
        if 'param_key' in path_opt and 'param_key_g' not in path_opt:
            path_opt['param_key_g'] = path_opt['param_key']
        if opt.get('val') is not None:
            opt['val'].setdefault('suffix', None)

    def model_to_device(self, net):
        """Move ``net`` to the device; wrap it in DDP (CPU too) or DataParallel like BasicSR."""
        net = net.to(self.device)
        if self.opt['dist']:
            device_ids = [torch.cuda.current_device()] if self.device.type == 'cuda' else None
            net = DistributedDataParallel(
                net, device_ids=device_ids, find_unused_parameters=self.opt.get('find_unused_parameters', False))
        elif self.opt['num_gpu'] > 1:
            net = DataParallel(net)
        return net

    def init_training_settings(self):
        """Set up EMA, losses, optimizers, schedulers and the training controls."""
        self.net_g.train()
        self.setup_ema()
        self.setup_losses()
        self.setup_optimizers()
        self.setup_schedulers()
        self.setup_train_controls()

    def setup_ema(self):
        """Build ``net_g_ema`` when ``train.ema_decay`` > 0 (as ``SRModel`` does)."""
        self.ema_decay = self.opt['train'].get('ema_decay', 0)
        if self.ema_decay > 0:
            get_root_logger().info(f'Use Exponential Moving Average with decay: {self.ema_decay}')
            self.net_g_ema = build_network(self.opt['network_g']).to(self.device)
            load_path = self.opt['path'].get('pretrain_network_g')
            if load_path is not None:
                self.load_network(self.net_g_ema, load_path, self.opt['path'].get('strict_load_g', True),
                                  'params_ema')
            else:
                self.model_ema(0)
            self.net_g_ema.eval()

    def setup_losses(self):
        """Build ``cri_pix`` (``train.pixel_opt``) and ``cri_perceptual`` (``train.perceptual_opt``).

        Subclasses with other losses override this (and :meth:`compute_losses`).
        """
        train_opt = self.opt['train']
        self.cri_pix = build_loss(train_opt['pixel_opt']).to(self.device) if train_opt.get('pixel_opt') else None
        self.cri_perceptual = (build_loss(train_opt['perceptual_opt']).to(self.device)
                               if train_opt.get('perceptual_opt') else None)
        if self.cri_pix is None and self.cri_perceptual is None:
            raise ValueError('No loss configured: set train.pixel_opt and/or train.perceptual_opt.')

    def trainable_parameters(self):
        """Parameters the optimizer updates (and gradient clipping sees).

        Returns:
            list[torch.nn.Parameter]: Parameters of ``net_g`` with ``requires_grad``.
        """
        return [p for p in self.net_g.parameters() if p.requires_grad]

    def setup_optimizers(self):
        """Build ``optimizer_g`` from ``train.optim_g`` over :meth:`trainable_parameters`."""
        frozen = [name for name, p in self.net_g.named_parameters() if not p.requires_grad]
        if frozen:
            get_root_logger().info(f'{len(frozen)} parameter tensor(s) of net_g are frozen, e.g. {frozen[:3]}.')
        optim_opt = dict(self.opt['train']['optim_g'])
        optim_type = optim_opt.pop('type')
        self.optimizer_g = self.get_optimizer(optim_type, self.trainable_parameters(), **optim_opt)
        self.optimizers.append(self.optimizer_g)

    def get_optimizer(self, optim_type, params, lr, **kwargs):
        """Build an optimizer by name (``Adam``, ``AdamW``, ``SGD``)."""
        if optim_type not in OPTIMIZERS:
            raise NotImplementedError(f"Optimizer '{optim_type}' (option train.optim_g.type) is not supported; "
                                      f'use one of {sorted(OPTIMIZERS)}.')
        if 'betas' in kwargs:
            kwargs['betas'] = tuple(kwargs['betas'])
        return OPTIMIZERS[optim_type](params, lr, **kwargs)

    def setup_schedulers(self):
        """Build one scheduler per optimizer from ``train.scheduler`` (not modified in place)."""
        sched_opt = dict(self.opt['train']['scheduler'])
        sched_type = sched_opt.pop('type')
        if sched_type not in SCHEDULERS:
            raise NotImplementedError(f"Scheduler '{sched_type}' (option train.scheduler.type) is not supported; "
                                      f'use one of {sorted(SCHEDULERS)}.')
        for optimizer in self.optimizers:
            self.schedulers.append(SCHEDULERS[sched_type](optimizer, **sched_opt))

    def setup_train_controls(self):
        """Read autocast, gradient clipping, non-finite handling, progressive and mixup options."""
        train_opt = self.opt['train']
        logger = get_root_logger()
        autocast = train_opt.get('autocast')
        self.autocast_dtype = None
        if autocast:
            if str(autocast) not in AUTOCAST_DTYPES:
                raise ValueError(f"Option train.autocast must be one of bf16, fp16 or null, got '{autocast}'.")
            if self.device.type == 'cuda':
                self.autocast_dtype = AUTOCAST_DTYPES[str(autocast)]
            else:
                logger.warning(f'train.autocast: {autocast} is ignored on CPU (mixed precision is CUDA-only).')
        self.grad_scaler = (torch.amp.GradScaler('cuda') if self.autocast_dtype == torch.float16 else None)
        self.use_grad_clip = bool(train_opt.get('use_grad_clip', False))
        self.grad_clip_norm = float(train_opt.get('grad_clip_norm', 0.01))
        self.max_nonfinite_steps = train_opt.get('max_nonfinite_steps', 10)
        self.nonfinite_in_a_row = 0
        self.nonfinite_total = 0
        self.progressive = self._read_progressive_options()
        self._progressive_stage = None
        mix = train_opt.get('mixing_augs') or {}
        self.use_mixup = bool(mix.get('mixup', False))
        self.mixup_beta = float(mix.get('mixup_beta', 1.2))
        self.mixup_use_identity = bool(mix.get('use_identity', False))

    def _read_progressive_options(self):
        train_opt = self.opt['train']
        dataset_opt = (self.opt.get('datasets') or {}).get('train') or {}
        if train_opt.get('progressive'):
            prog, where = train_opt['progressive'], 'train.progressive'
        elif all(k in dataset_opt for k in PROGRESSIVE_KEYS):
            prog, where = dataset_opt, 'datasets.train'
        else:
            return None
        missing = [k for k in PROGRESSIVE_KEYS if k not in prog]
        if missing:
            raise ValueError(f'Progressive training ({where}) needs the keys {list(PROGRESSIVE_KEYS)}; '
                             f'missing {missing}.')
        iters, batches, sizes = ([int(v) for v in prog[k]] for k in PROGRESSIVE_KEYS)
        if not (len(iters) == len(batches) == len(sizes)) or not iters:
            raise ValueError(f'{where}.iters, mini_batch_sizes and gt_sizes must be non-empty lists of the same '
                             f'length; got {len(iters)}, {len(batches)} and {len(sizes)}.')
        if min(iters) <= 0 or min(batches) <= 0 or min(sizes) <= 0:
            raise ValueError(f'{where}.iters, mini_batch_sizes and gt_sizes must be positive.')
        batch = dataset_opt.get('batch_size_per_gpu')
        if batch is not None and max(batches) > int(batch):
            raise ValueError(f'{where}.mini_batch_sizes {batches} exceed datasets.train.batch_size_per_gpu={batch}.')
        gt_size = dataset_opt.get('gt_size')
        if gt_size is not None and max(sizes) > int(gt_size):
            raise ValueError(f'{where}.gt_sizes {sizes} exceed datasets.train.gt_size={gt_size}.')
        cumulative = [sum(iters[:i + 1]) for i in range(len(iters))]
        return {'cumulative': cumulative, 'mini_batch_sizes': batches, 'gt_sizes': sizes, 'where': where}

    # --------------------------------------------------------------- loading
    def _option_key_for(self, load_path):
        for key, value in (self.opt.get('path') or {}).items():
            if value == load_path and 'pretrain' in key:
                return f'path.{key}'
        return None

    def load_network(self, net, load_path, strict=True, param_key='params'):
        """Load weights of any supported layout into ``net`` (through ``utils/checkpoint.py``).

        Accepts BasicSR files (``params``/``params_ema``), Lightning checkpoints
        (``state_dict`` with ``net.`` prefix), DDP ``module.`` prefixes and plain state
        dicts, always with ``weights_only=True`` unless the top-level option
        ``trust_checkpoint`` is true.

        Args:
            net (nn.Module): Target network (DDP/DataParallel wrappers are unwrapped).
            load_path (str): Weights file.
            strict (bool): Fail on missing/unexpected keys or shape differences (the
                error lists them). When False, the matching keys are loaded and the rest
                is logged.
            param_key (str | None): Top-level key. If absent from the file, ``params`` is
                used when present (BasicSR's behaviour), otherwise the layout is
                detected; None detects it directly.

        Raises:
            FileNotFoundError, CheckpointError: Missing, unsafe or mismatching file.
        """
        logger = get_root_logger()
        net = self.get_bare_model(net)
        option_key = self._option_key_for(load_path)
        checkpoint = load_checkpoint_file(load_path, trust=bool(self.opt.get('trust_checkpoint', False)),
                                          option_key=option_key)
        if isinstance(checkpoint, dict) and param_key is not None and param_key not in checkpoint:
            fallback = 'params' if 'params' in checkpoint else None
            logger.info(f"Loading: '{param_key}' is not in {load_path}; using "
                        f"{repr(fallback) if fallback else 'the detected layout'} instead.")
            param_key = fallback
        state_dict, where = extract_state_dict(checkpoint, param_key)
        state_dict, prefix = strip_prefix(state_dict, net.state_dict().keys())
        logger.info(f'Loading {type(net).__name__} model from {load_path} ({where}'
                    f"{f', prefix {prefix!r} stripped' if prefix else ''}).")
        report = compare_state_dicts(net.state_dict(), state_dict)
        if any(report.values()):
            text = format_mismatch(report)
            where_txt = f"'{load_path}'" + (f" (option '{option_key}')" if option_key else '')
            if strict:
                raise CheckpointError(f'Checkpoint {where_txt} does not fit {type(net).__name__}:\n{text}\n'
                                      'Set path.strict_load_g: false to load the matching part only.')
            logger.warning(f'Loading {where_txt} non-strictly:\n{text}')
            shape_bad = {k for k, _, _ in report['shape']}
            state_dict = {k: v for k, v in state_dict.items() if k not in shape_bad}
        net.load_state_dict(state_dict, strict=strict)

    # --------------------------------------------------------------- training
    def update_learning_rate(self, current_iter, warmup_iter=-1):
        """BasicSR's per-iteration LR update; also records ``self.current_iter``."""
        self.current_iter = current_iter
        super().update_learning_rate(current_iter, warmup_iter)

    def validation(self, dataloader, current_iter, tb_logger, save_img=False):
        """BasicSR's validation; training-only batch transforms are off meanwhile."""
        self._validating = True
        try:
            super().validation(dataloader, current_iter, tb_logger, save_img)
        finally:
            self._validating = False

    def feed_data(self, data):
        """Move a batch to the device and set ``self.data``, ``self.lq`` and ``self.gt``.

        Every tensor in ``data`` is moved to ``self.device``; other values (paths, names)
        are kept. If the batch carries ``sigma`` (pending synthetic noise from the
        all-in-one datasets), the noise is added here on the device. During training
        (not validation) progressive patch sizes and mixup are applied when configured.

        Args:
            data (dict): A batch from a BasicSR dataloader; ``lq`` is (B, C, H, W), RGB,
                [0, 1]; ``gt`` (optional) has the same layout.
        """
        data = {k: (v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in data.items()}
        self._check_pair_sizes(data)
        if 'sigma' in data:
            try:
                from perceive_ir_plugin.data.degradations import apply_pending_noise
            except ImportError as err:
                raise RuntimeError("The batch carries 'sigma' (noise still to be added), but perceive_ir_plugin."
                                   'data.degradations.apply_pending_noise is not available.') from err
            data = apply_pending_noise(data)
        if self.is_train and not self._validating:
            if getattr(self, 'progressive', None) is not None:
                data = self._apply_progressive(data)
            if getattr(self, 'use_mixup', False):
                data = self._apply_mixup(data)
        self.data = data
        self.lq = data['lq']
        if 'gt' in data:
            self.gt = data['gt']

    def _check_pair_sizes(self, data):
        """Raise a ValueError naming the files when ``gt`` is not ``scale`` times ``lq``.

        BasicSR's paired datasets crop only in training; a validation or test pair whose
        sizes differ would otherwise fail deep inside a metric or the loss.
        """
        lq, gt = data.get('lq'), data.get('gt')
        if not (torch.is_tensor(lq) and torch.is_tensor(gt)):
            return
        scale = int(self.opt.get('scale', 1) or 1)
        lq_hw, gt_hw = tuple(lq.shape[-2:]), tuple(gt.shape[-2:])
        if (gt_hw[0], gt_hw[1]) == (lq_hw[0] * scale, lq_hw[1] * scale):
            return

        def names(key):
            paths = data.get(key)
            if isinstance(paths, str):
                paths = [paths]
            if not paths:
                return f'<{key} not in the batch>'
            shown = ', '.join(str(p) for p in list(paths)[:3])
            return shown + (f' (+{len(paths) - 3} more)' if len(paths) > 3 else '')

        expect = f' (scale {scale})' if scale != 1 else ''
        raise ValueError(f'GT/LQ size mismatch{expect}: lq {names("lq_path")} is {lq_hw[0]}x{lq_hw[1]} but '
                         f'gt {names("gt_path")} is {gt_hw[0]}x{gt_hw[1]} (height x width). Fix or remove '
                         'the pair; restoration pairs must be pixel-aligned.')

    def _apply_progressive(self, data):
        prog = self.progressive
        stage = min(bisect.bisect_left(prog['cumulative'], self.current_iter), len(prog['cumulative']) - 1)
        mini_batch, mini_size = prog['mini_batch_sizes'][stage], prog['gt_sizes'][stage]
        if stage != self._progressive_stage:
            self._progressive_stage = stage
            get_root_logger().info(f'Progressive training from iteration {self.current_iter}: patch size '
                                   f'{mini_size}, batch size {mini_batch} per GPU.')
        lq = data['lq']
        batch, (height, width) = lq.shape[0], lq.shape[-2:]
        if mini_size > min(height, width):
            raise ValueError(f'{prog["where"]}.gt_sizes asks for {mini_size}px patches but the loader delivers '
                             f'{height}x{width} LQ patches (datasets.train.gt_size too small).')
        index = sorted(random.sample(range(batch), k=mini_batch)) if mini_batch < batch else None
        y0 = int((height - mini_size) * random.random())
        x0 = int((width - mini_size) * random.random())
        out = {}
        for key, value in data.items():
            if torch.is_tensor(value) and value.dim() >= 1 and value.shape[0] == batch:
                if index is not None:
                    value = value[index]
                if value.dim() == 4 and tuple(value.shape[-2:]) != (height, width):
                    scale = value.shape[-2] // height  # GT of a super-resolution pair
                    value = value[..., y0 * scale:(y0 + mini_size) * scale, x0 * scale:(x0 + mini_size) * scale]
                elif value.dim() == 4:
                    value = value[..., y0:y0 + mini_size, x0:x0 + mini_size]
            elif index is not None and isinstance(value, (list, tuple)) and len(value) == batch:
                value = type(value)(value[i] for i in index)
            out[key] = value
        return out

    def _apply_mixup(self, data):
        if self.mixup_use_identity and random.randint(0, 1) == 1:
            return data
        lam = torch.distributions.Beta(self.mixup_beta, self.mixup_beta).sample().item()
        perm = torch.randperm(data['lq'].shape[0], device=data['lq'].device)
        data = dict(data)
        for key in ('lq', 'gt'):
            if key in data:
                data[key] = lam * data[key] + (1 - lam) * data[key][perm]
        return data

    def autocast_context(self):
        """``torch.autocast`` for ``train.autocast`` on CUDA; a no-op context otherwise."""
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(device_type='cuda', dtype=self.autocast_dtype)

    def net_forward(self, net, lq):
        """Call a network; the one place to add extra inputs in subclasses.

        Args:
            net (nn.Module): ``net_g``, ``net_g_ema`` or a wrapped version.
            lq (Tensor): (B, C, H, W) degraded input, RGB, [0, 1] (a padded tile at test).

        Returns:
            Tensor: (B, C', H, W) restored image, RGB, nominally [0, 1].
        """
        return net(lq)

    def compute_losses(self, output):
        """Training losses against ``self.gt``.

        Args:
            output (Tensor | list[Tensor]): ``net_forward`` result; a list sums the
                pixel loss over its elements (multi-output networks).

        Returns:
            tuple[Tensor, OrderedDict[str, Tensor]]: Total loss and the named terms
            (``l_pix``, ``l_percep``, ``l_style``).
        """
        outputs = list(output) if isinstance(output, (list, tuple)) else [output]
        loss_dict = OrderedDict()
        l_total = 0
        if self.cri_pix:
            l_pix = sum(self.cri_pix(out, self.gt) for out in outputs)
            loss_dict['l_pix'] = l_pix
            l_total = l_total + l_pix
        if self.cri_perceptual:
            l_percep, l_style = self.cri_perceptual(outputs[-1], self.gt)
            if l_percep is not None:
                loss_dict['l_percep'] = l_percep
                l_total = l_total + l_percep
            if l_style is not None:
                loss_dict['l_style'] = l_style
                l_total = l_total + l_style
        return l_total, loss_dict

    def _all_ranks_true(self, flag):
        """Logical AND of a Python bool over all DDP ranks (the flag itself when not distributed)."""
        if not self.opt.get('dist'):
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
        return bool(t.item() > 0)

    def optimize_parameters(self, current_iter):
        """One training step (see the class docstring for the options involved)."""
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=True)
        with self.autocast_context():
            self.output = self.net_forward(self.net_g, self.lq)
            l_total, loss_dict = self.compute_losses(self.output)
        if not self._all_ranks_true(bool(torch.isfinite(l_total.detach()).all())):
            if self.opt.get('dist'):  # keep DDP's reducer in step with the other ranks
                (l_total * 0).backward()
            self._skip_step(current_iter, loss_dict, 'loss')
            return

        if self.grad_scaler is not None:
            self.grad_scaler.scale(l_total).backward()
        else:
            l_total.backward()
        if self.use_grad_clip:
            if self.grad_scaler is not None:
                for optimizer in self.optimizers:
                    self.grad_scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable_parameters(), self.grad_clip_norm)
            if self.grad_scaler is None and not bool(torch.isfinite(grad_norm)):
                self._skip_step(current_iter, loss_dict, 'gradient norm')
                return
        if self.grad_scaler is not None:
            for optimizer in self.optimizers:
                self.grad_scaler.step(optimizer)
            self.grad_scaler.update()
        else:
            for optimizer in self.optimizers:
                optimizer.step()
        self.nonfinite_in_a_row = 0
        self.log_dict = self.reduce_loss_dict(loss_dict)
        if self.ema_decay > 0:
            self.model_ema(decay=self.ema_decay)

    def _skip_step(self, current_iter, loss_dict, what):
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=True)
        self.nonfinite_in_a_row += 1
        self.nonfinite_total += 1
        self.log_dict = self.reduce_loss_dict(loss_dict) if loss_dict else OrderedDict()
        self.log_dict['nonfinite_steps'] = float(self.nonfinite_total)
        terms = ', '.join(f'{k}={float(v.detach().float().mean()):.4g}' for k, v in loss_dict.items())
        get_root_logger().warning(f'Iteration {current_iter}: non-finite {what} ({terms}); step skipped '
                                  f'({self.nonfinite_in_a_row} in a row, {self.nonfinite_total} in total).')
        limit = self.max_nonfinite_steps
        if limit is not None and self.nonfinite_in_a_row >= int(limit):
            raise RuntimeError(f'Training stopped at iteration {current_iter}: {self.nonfinite_in_a_row} non-finite '
                               f'steps in a row (train.max_nonfinite_steps={limit}). Checkpoints already written '
                               'are untouched; lower the learning rate, enable train.use_grad_clip or check the '
                               'data, then resume.')

    # ------------------------------------------------------------------ testing
    def _size_multiple(self, net):
        val_opt = self.opt.get('val') or {}
        for key in ('size_multiple', 'window_size'):
            if val_opt.get(key):
                return int(val_opt[key])
        return int(getattr(self.get_bare_model(net), 'size_multiple', 1) or 1)

    def inference(self, net, lq):
        """Padded, optionally tiled forward of ``net`` through :meth:`net_forward`.

        Args:
            net (nn.Module): Network in eval mode.
            lq (Tensor): (B, C, H, W) input, RGB, [0, 1].

        Returns:
            Tensor: (B, C', H, W) output.
        """
        val_opt = self.opt.get('val') or {}
        tile_opt = val_opt.get('tile') or {}
        if tile_opt and not isinstance(tile_opt, dict):
            raise ValueError(f'Option val.tile must be a mapping {{size, overlap}}, got {tile_opt!r}.')
        return tiled_forward(lambda x: self.net_forward(net, x), lq, tile=tile_opt.get('size'),
                             overlap=tile_opt.get('overlap', 32), multiple=self._size_multiple(net),
                             pad_mode=val_opt.get('pad_mode', 'reflect'))

    def test(self):
        """Eval-mode, no-grad restoration of ``self.lq`` with ``net_g_ema`` if present; sets ``self.output``."""
        net = self.net_g_ema if hasattr(self, 'net_g_ema') else self.net_g
        was_training = net.training
        net.eval()
        with torch.no_grad():
            self.output = self.inference(net, self.lq)
        if was_training:
            net.train()

    # ------------------------------------------------------------------- saving
    @master_only
    def save_network(self, net, net_label, current_iter, param_key='params'):
        """Atomically write ``models/<net_label>_<iter>.pth`` = ``{param_key: state_dict}``.

        Same content and names as BasicSR's; the write goes to a temporary file that
        replaces the destination only when complete.

        Returns:
            bool: True when written (False after ``SAVE_RETRIES`` failures, which are
            logged; the previous file is then unchanged).
        """
        label = 'latest' if current_iter == -1 else current_iter
        save_path = os.path.join(self.opt['path']['models'], f'{net_label}_{label}.pth')
        nets = net if isinstance(net, list) else [net]
        keys = param_key if isinstance(param_key, list) else [param_key]
        if len(nets) != len(keys):
            raise ValueError('save_network: the lengths of net and param_key differ.')
        save_dict = {key: self.network_state_to_save(net_) for net_, key in zip(nets, keys)}
        return self._save_with_retries(save_dict, save_path)

    def network_state_to_save(self, net):
        """What ``save_network`` writes for one network: its bare state dict on the CPU.

        Subclasses that save only part of a network (the stage-1 prompts) override this.

        Returns:
            OrderedDict[str, Tensor]: Keys without a ``module.`` prefix.
        """
        state_dict = self.get_bare_model(net).state_dict()
        return OrderedDict(
            (k[len('module.'):] if k.startswith('module.') else k, v.detach().cpu()) for k, v in state_dict.items())

    @staticmethod
    def _save_with_retries(obj, path):
        logger = get_root_logger()
        for attempt in range(1, SAVE_RETRIES + 1):
            try:
                atomic_torch_save(obj, path)
                return True
            except Exception as err:  # noqa: BLE001 -- any write failure is retried, then reported
                logger.warning(f'Saving {path} failed (attempt {attempt}/{SAVE_RETRIES}): {err}')
                if attempt < SAVE_RETRIES:
                    time.sleep(SAVE_RETRY_DELAY)
        logger.error(f'Could not save {path}; the previous file (if any) is unchanged.')
        return False

    def save(self, epoch, current_iter):
        """Save ``net_g`` (+ ``params_ema``) and then the training state.

        The training state of an iteration is written only after its network file, so
        the newest ``*.state`` always has its weights on disk (what resuming needs).
        """
        if hasattr(self, 'net_g_ema'):
            ok = self.save_network([self.net_g, self.net_g_ema], 'net_g', current_iter,
                                   param_key=['params', 'params_ema'])
        else:
            ok = self.save_network(self.net_g, 'net_g', current_iter)
        if ok is False:
            get_root_logger().error(f'Training state of iteration {current_iter} not written because its network '
                                    'file could not be saved.')
            return
        self.save_training_state(epoch, current_iter)

    def extra_training_state(self):
        """Extra entries for the training state (plain values / tensors only).

        Returns:
            dict: ``grad_scaler`` state when fp16 autocast is on. Subclasses add theirs.
        """
        extra = {}
        if getattr(self, 'grad_scaler', None) is not None:
            extra['grad_scaler'] = self.grad_scaler.state_dict()
        return extra

    def load_extra_training_state(self, state):
        """Restore what :meth:`extra_training_state` saved (missing entries are ignored)."""
        if getattr(self, 'grad_scaler', None) is not None and 'grad_scaler' in state:
            self.grad_scaler.load_state_dict(state['grad_scaler'])

    @master_only
    def save_training_state(self, epoch, current_iter):
        """Atomically write ``training_states/<iter>.state`` (epoch, iter, optimizers, schedulers, extras)."""
        if current_iter == -1:
            return True
        state = {'epoch': epoch, 'iter': current_iter,
                 'optimizers': [o.state_dict() for o in self.optimizers],
                 'schedulers': [s.state_dict() for s in self.schedulers]}
        state.update(self.extra_training_state())
        save_path = os.path.join(self.opt['path']['training_states'], f'{current_iter}.state')
        return self._save_with_retries(state, save_path)

    def resume_training(self, resume_state):
        """Restore optimizers, schedulers and extras from a training state."""
        if len(resume_state['optimizers']) != len(self.optimizers) or \
                len(resume_state['schedulers']) != len(self.schedulers):
            raise ValueError(f"Training state has {len(resume_state['optimizers'])} optimizer(s) and "
                             f"{len(resume_state['schedulers'])} scheduler(s); this model has "
                             f'{len(self.optimizers)} and {len(self.schedulers)} (changed train options?).')
        super().resume_training(resume_state)
        self.load_extra_training_state(resume_state)
