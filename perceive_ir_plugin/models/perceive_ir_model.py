"""Perceive-IR stage 2: restoration with L1 + L_cl + L_clip + L_dpl (SPEC §3-§8)."""
import math

import torch
import torch.distributed as dist

from basicsr.losses import build_loss
from basicsr.utils import get_root_logger
from basicsr.utils.dist_util import get_dist_info
from basicsr.utils.registry import MODEL_REGISTRY
from perceive_ir_plugin.models.dpl_probe import build_probe_set, probe_psnr
from perceive_ir_plugin.models.image_restoration_model import ImageRestorationModel
from perceive_ir_plugin.models.proxies import ProxyBank, psnr_per_sample


@MODEL_REGISTRY.register()
class PerceiveIRModel(ImageRestorationModel):
    """Stage-2 model of Perceive-IR on top of :class:`ImageRestorationModel`.

    ``L_total = L1 + λ1·L_cl + λ2·L_clip + λ3·L_dpl`` with the λ as the ``loss_weight`` of
    each loss option (release: 0.1 / 0.05 / 0.1). Every term is optional; ``network_g`` is
    :class:`PerceiveIRNet`, :class:`PerceiveIRWrapper` (any backbone) or, without L_cl,
    any network. Frozen parts never enter ``net_g``'s parameters, DDP or ``params``: the
    DINOv2 is hidden inside the network, CLIP and VGG live in the losses, the proxies in a
    :class:`ProxyBank`.

    Options beyond :class:`ImageRestorationModel`'s:

    * ``path.pretrain_network_backbone`` (+ ``param_key_backbone``, ``strict_load_backbone``):
      an official checkpoint (Restormer ``params``, NAFNet ``params``, PromptIR Lightning
      ``model.ckpt``...) loaded into the inner backbone of a ``PerceiveIRWrapper`` before
      anything else (``pretrain_network_g``, when given too, is loaded after it);
    * ``train.contrastive_opt``: ``{type: DegradationContrastiveLoss, loss_weight, temperature}``;
      needs ``datasets.train.return_lq_pos: true``;
    * ``train.clip_opt``: ``{type: QualityCLIPLoss, loss_weight, perceiver: {...}, logit_scale}``;
    * ``train.dpl_opt``: ``{type: DifficultyAdaptivePerceptualLoss, loss_weight, vgg_weights, ...}``;
    * ``train.proxies``: list of proxies (see :class:`ProxyBank`);
    * ``train.dpl_probe``: ``{interval: epoch | <iterations>, per_task: 24, candidates: 96,
      crop: 256, batch_size: 4, dataroot / tasks / sigmas (default: datasets.train's)}``.

    Epochs inside BasicSR's loop: the model is not told when an epoch starts, so it
    computes the loader's iterations per epoch exactly as BasicSR builds it
    (``floor(ceil(len(dataset) · enlarge_ratio / world_size) / batch)``, the last
    incomplete batch being dropped) and counts from the first iteration of the run (after a
    resume BasicSR restarts the epoch, so counting restarts at the resumed iteration). The
    probe runs at the first iteration of every epoch, before the step.
    """

    def __init__(self, opt):
        self.aux = None
        self.reference_psnr = None
        self._train_forward = False
        self._backbone_loaded = False
        self._probe_set = None
        self._probe_epoch = None
        self._epoch_origin = 0
        self._epoch_offset = 0
        self._iters_per_epoch = None
        super().__init__(opt)

    # ------------------------------------------------------------------ set-up
    def model_to_device(self, net):
        """Load ``path.pretrain_network_backbone`` (once, before DDP wrapping), then move/wrap."""
        path_opt = self.opt.get('path') or {}
        backbone_path = path_opt.get('pretrain_network_backbone')
        if backbone_path and not self._backbone_loaded:
            if not hasattr(net, 'load_backbone'):
                raise ValueError('Option path.pretrain_network_backbone needs network_g.type PerceiveIRWrapper '
                                 f'(got {type(net).__name__}); use path.pretrain_network_g for whole networks.')
            net.load_backbone(backbone_path, param_key=path_opt.get('param_key_backbone'),
                              strict=path_opt.get('strict_load_backbone', True),
                              trust=bool(self.opt.get('trust_checkpoint', False)),
                              option_key='path.pretrain_network_backbone')
            self._backbone_loaded = True
        return super().model_to_device(net)

    def setup_losses(self):
        """L1 (``pixel_opt``) from the base, then L_cl, L_clip, L_dpl, proxies and the probe settings."""
        super().setup_losses()
        train_opt = self.opt['train']
        self.cri_cl = build_loss(train_opt['contrastive_opt']).to(self.device) if train_opt.get(
            'contrastive_opt') else None
        self.cri_clip = build_loss(train_opt['clip_opt']).to(self.device) if train_opt.get('clip_opt') else None
        self.cri_dpl = build_loss(train_opt['dpl_opt']).to(self.device) if train_opt.get('dpl_opt') else None
        if self.cri_cl is not None:
            bare = self.get_bare_model(self.net_g)
            if not hasattr(bare, 'cfe'):
                raise ValueError('train.contrastive_opt needs a network with a CFE (PerceiveIRNet or '
                                 f'PerceiveIRWrapper); network_g is {type(bare).__name__}.')
            if not (self.opt.get('datasets') or {}).get('train', {}).get('return_lq_pos', False):
                raise ValueError('train.contrastive_opt needs datasets.train.return_lq_pos: true (the positive '
                                 'is a second crop of the same degraded image).')
        self.proxies = None
        if self.cri_dpl is not None and train_opt.get('proxies'):
            self.proxies = ProxyBank(train_opt['proxies'], trust=bool(self.opt.get('trust_checkpoint', False)))
            self.proxies.to(self.device)
        elif train_opt.get('proxies'):
            get_root_logger().warning('train.proxies is set but train.dpl_opt is not: the proxies are unused.')
        self.probe_opt = dict(train_opt.get('dpl_probe') or {})
        unknown = set(self.probe_opt) - {'interval', 'per_task', 'candidates', 'crop', 'batch_size', 'dataroot',
                                         'tasks', 'sigmas', 'split'}
        if unknown:
            raise ValueError(f'train.dpl_probe: unknown option(s) {sorted(unknown)}.')

    # ----------------------------------------------------------------- epochs
    def iters_per_epoch(self):
        """Iterations of one epoch of BasicSR's training loop (or ``dpl_probe.interval`` if an int)."""
        if self._iters_per_epoch is None:
            interval = self.probe_opt.get('interval', 'epoch')
            if isinstance(interval, int) and not isinstance(interval, bool):
                if interval < 1:
                    raise ValueError(f'train.dpl_probe.interval must be >= 1 or "epoch", got {interval}.')
                self._iters_per_epoch = interval
            elif interval == 'epoch':
                from basicsr.data import build_dataset
                ds_opt = dict(self.opt['datasets']['train'])
                ds_opt['phase'] = 'train'
                if 'scale' in self.opt:
                    ds_opt['scale'] = self.opt['scale']
                length = len(build_dataset(ds_opt))
                world = self.opt.get('world_size', 1) if self.opt.get('dist') else 1
                ratio = ds_opt.get('dataset_enlarge_ratio', 1)
                batch = ds_opt['batch_size_per_gpu']
                if not self.opt.get('dist') and self.opt.get('num_gpu', 0) > 1:
                    batch *= self.opt['num_gpu']
                self._iters_per_epoch = max(1, math.ceil(length * ratio / world) // batch)
                get_root_logger().info(f'DPL probe: {self._iters_per_epoch} iterations per epoch '
                                       f'({length} samples x{ratio}, batch {batch}, {world} rank(s)).')
            else:
                raise ValueError(f'train.dpl_probe.interval must be "epoch" or an integer, got {interval!r}.')
        return self._iters_per_epoch

    def epoch_of(self, current_iter):
        """Epoch index of a (1-based) iteration, counted like BasicSR's loop (see the class docstring)."""
        return self._epoch_offset + (current_iter - 1 - self._epoch_origin) // self.iters_per_epoch()

    def resume_training(self, resume_state):
        """Restore optimizers/schedulers; epochs restart at the resumed iteration (as BasicSR's loader does)."""
        super().resume_training(resume_state)
        self._epoch_origin = int(resume_state.get('iter', 0))
        self._epoch_offset = int(resume_state.get('epoch', 0))
        self._probe_epoch = None

    # ------------------------------------------------------------------ probe
    def _probe_args(self):
        ds_opt = self.opt['datasets']['train']
        tasks = self.probe_opt.get('tasks') or ds_opt.get('tasks')
        if tasks is None:
            from perceive_ir_plugin.data.tasks import resolve_task_repeats
            tasks = resolve_task_repeats(None, ds_opt.get('setting', '3task'))
        tasks = list(tasks)  # dict task -> repeat gives its keys
        return dict(dataroot=self.probe_opt.get('dataroot', ds_opt.get('dataroot')), tasks=tasks,
                    split=self.probe_opt.get('split', ds_opt.get('split', 'train')),
                    per_task=int(self.probe_opt.get('per_task', 24)),
                    candidates=int(self.probe_opt.get('candidates', 96)), crop=int(self.probe_opt.get('crop', 256)),
                    sigmas=self.probe_opt.get('sigmas', ds_opt.get('sigmas', (15, 25, 50))))

    def update_reference_psnr(self, current_iter=None):
        """Run the current network on the probe set and store its mean PSNR (dB) as the DPL reference."""
        if self._probe_set is None:
            self._probe_set = build_probe_set(**self._probe_args())
        net = self.get_bare_model(self.net_g)
        was_training = net.training
        net.eval()
        rank, world = get_dist_info()

        def forward(lq):
            with torch.no_grad(), self.autocast_context():
                return self.net_forward(net, lq.to(self.device)).float()

        try:
            total, count = probe_psnr(forward, self._probe_set, int(self.probe_opt.get('batch_size', 4)), rank, world)
        finally:
            net.train(was_training)
        if world > 1 and dist.is_initialized():
            t = torch.tensor([total, float(count)], device=self.device, dtype=torch.float64)
            dist.all_reduce(t)
            total, count = float(t[0]), int(t[1])
        self.reference_psnr = total / max(count, 1)
        get_root_logger().info(f'DPL probe at iteration {current_iter}: reference PSNR {self.reference_psnr:.3f} dB '
                               f'over {count} crops.')
        return self.reference_psnr

    # --------------------------------------------------------------- training
    def optimize_parameters(self, current_iter):
        """Probe at an epoch start (when proxies need α), then the base step with the auxiliary forward."""
        if self.cri_dpl is not None and self.proxies is not None and len(self.proxies):
            epoch = self.epoch_of(current_iter)
            if epoch != self._probe_epoch:
                self.update_reference_psnr(current_iter)
                self._probe_epoch = epoch
        self._train_forward = True
        try:
            super().optimize_parameters(current_iter)
        finally:
            self._train_forward = False
            self.aux = None
        if self.reference_psnr is not None:
            self.log_dict['dpl_ref_psnr'] = self.reference_psnr

    def net_forward(self, net, lq):
        """Training step with L_cl: also the Z of ``lq`` and of the second crop ``lq_pos`` (in ``self.aux``)."""
        if self._train_forward and self.cri_cl is not None:
            if 'lq_pos' not in self.data:
                raise KeyError("L_cl needs the batch field 'lq_pos': set datasets.train.return_lq_pos: true.")
            out, self.aux = net(lq, x_pos=self.data['lq_pos'], return_aux=True)
            return out
        return net(lq)

    def compute_losses(self, output):
        """L1 from the base plus ``l_cl``, ``l_clip``, ``l_dpl``; also logs ``l_total`` and ``dpl_hard``."""
        l_total, loss_dict = super().compute_losses(output)
        if self.cri_cl is not None:
            l_cl = self.cri_cl(self.aux['z'], self.aux['z_pos'], self.data['task'])
            loss_dict['l_cl'] = l_cl
            l_total = l_total + l_cl
        if self.cri_clip is not None:
            l_clip = self.cri_clip(output)
            loss_dict['l_clip'] = l_clip
            l_total = l_total + l_clip
        if self.cri_dpl is not None:
            proxies = mask = alpha = None
            if self.proxies is not None and len(self.proxies):
                with torch.no_grad():
                    proxies, mask = self.proxies(self.data, self.lq)
                    psnr = torch.stack([psnr_per_sample(proxies[:, k], self.gt) for k in range(proxies.shape[1])],
                                       dim=1)
                    if self.reference_psnr is None:
                        raise RuntimeError('L_dpl with proxies needs the probe PSNR: call update_reference_psnr() '
                                           'first (optimize_parameters does it at every epoch start).')
                    alpha = self.cri_dpl.difficulty_alpha(psnr, self.reference_psnr)
                    valid = mask > 0
                    hard = (alpha > 1) & valid
                    loss_dict['dpl_hard'] = hard.sum().float() / valid.sum().clamp(min=1).float()
            l_dpl = self.cri_dpl(output, self.gt, self.lq, proxies, mask, alpha)
            loss_dict['l_dpl'] = l_dpl
            l_total = l_total + l_dpl
        loss_dict['l_total'] = l_total.detach()
        return l_total, loss_dict
