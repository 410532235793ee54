"""AMIRNet training: restoration loss + per-level tree classification, with K-means tree growth.

The network (``AMIRNet`` or any tree-conditioned backbone of ``archs/conditioning_arch.py``)
predicts a soft path through a degradation tree. This model

1. starts with the root level only (every sample in node 0);
2. every ``train.tree_split_iters`` iterations builds the next level: it runs the
   degradation encoder (eval mode, no gradients) over the training set for
   ``train.tree_passes`` passes with fresh random crops, averages per sample key the
   (degraded - clean) features, and splits every leaf in ``branching`` children with
   K-means (:class:`~perceive_ir_plugin.utils.degradation_tree.DegradationTree`); older
   levels stay frozen. Under DDP the features of all ranks are gathered, rank 0 clusters
   and the tree is broadcast back;
3. trains with ``0.85 * SmoothL1(beta=0.03) + 0.15 * (1 - SSIM)`` on the output clamped to
   [0, 1] plus the sum over built levels of the cross-entropy between the node
   classifier and the pseudo-labels;
4. stores the tree in the training state (``degradation_tree``), so a resumed run
   continues with the same labels and the same split schedule.
"""
from collections import OrderedDict

import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader, Subset

from basicsr.data import build_dataset
from basicsr.utils import get_root_logger
from basicsr.utils.dist_util import get_dist_info
from basicsr.utils.registry import MODEL_REGISTRY

from perceive_ir_plugin.models.image_restoration_model import ImageRestorationModel
from perceive_ir_plugin.utils.degradation_tree import DegradationTree

TREE_FEATURES = ('pred', 'embedding')


def _gaussian_window(size, sigma, channels, device, dtype):
    coords = torch.arange(size, device=device, dtype=dtype) - (size - 1) / 2
    g = torch.exp(-coords**2 / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).expand(channels, 1, size, size).contiguous()


def ssim(x, y, window_size=11, sigma=1.5, data_range=1.0):
    """Differentiable mean SSIM (Gaussian window, 'valid' filtering, per channel).

    Args:
        x (Tensor): (B, C, H, W) image, [0, data_range].
        y (Tensor): (B, C, H, W) reference, same range.
        window_size (int): Gaussian window size (11, as in Wang et al. 2004).
        sigma (float): Gaussian standard deviation (1.5).
        data_range (float): Dynamic range (1 for [0, 1] images).

    Returns:
        Tensor: scalar, mean SSIM over batch, channels and window positions.
    """
    if min(x.shape[-2:]) < window_size:
        raise ValueError(f'SSIM needs images of at least {window_size}x{window_size} px, got '
                         f'{x.shape[-2]}x{x.shape[-1]} (raise datasets.train.gt_size or set train.ssim_weight: 0).')
    c = x.shape[1]
    window = _gaussian_window(window_size, sigma, c, x.device, x.dtype)
    c1, c2 = (0.01 * data_range)**2, (0.03 * data_range)**2

    def filt(t):
        return F.conv2d(t, window, groups=c)

    mu_x, mu_y = filt(x), filt(y)
    var_x = filt(x * x) - mu_x**2
    var_y = filt(y * y) - mu_y**2
    cov = filt(x * y) - mu_x * mu_y
    num = (2 * mu_x * mu_y + c1) * (2 * cov + c2)
    den = (mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2)
    return (num / den).mean()


@MODEL_REGISTRY.register()
class AMIRNetModel(ImageRestorationModel):
    """AMIRNet's training recipe on top of :class:`ImageRestorationModel`.

    ``network_g`` must be a tree-conditioned network (``AMIRNet``, ``ConditionedNAFNet``,
    ``ConditionedRestormer``, ``ConditionedPromptIR``). Training batches must carry a
    stable per-sample ``key`` (``AllInOneDataset`` does); BasicSR's paired datasets'
    ``gt_path`` is used when there is no ``key``. Pending synthetic noise levels are part
    of the tree key (see :meth:`batch_keys`).

    Options under ``train`` (defaults in brackets):

    * ``smooth_l1_weight`` [0.85], ``smooth_l1_beta`` [0.03], ``ssim_weight`` [0.15],
      ``clamp_output`` [true]: restoration loss on the output clamped to [0, 1];
    * ``tree_ce_weight`` [1.0]: weight of the summed per-level cross-entropy;
    * ``tree_split_iters`` (required): a new level is built at iterations
      ``T, 2T, ...`` until the tree has ``depth`` levels;
    * ``tree_passes`` [5]: passes over the training set per split (fresh crops each);
    * ``tree_batch_size`` [32], ``tree_num_workers`` [``num_worker_per_gpu`` of the
      train set, at least 1]: loader of the feature extraction. It runs on its own copy of
      the training set; with LMDB packs keep both this and the train loader's
      ``num_worker_per_gpu`` >= 1, because py-lmdb refuses to open one environment twice
      in a process (worker processes keep the main process free of open environments);
    * ``tree_max_samples`` [null]: use at most this many (evenly spaced) dataset indices
      per pass (null: the whole set, as AMIRNet);
    * ``tree_feature`` ['pred']: ``'pred'`` (AMIRNet: masked pred-head differences) or
      ``'embedding'`` (pooled encoder-feature differences);
    * ``tree_kmeans`` ['torch']: K-means back-end, ``'torch'`` or ``'sklearn'``;
      ``tree_kmeans_n_init`` [10];
    * ``tree_seed`` [``manual_seed`` or 0]: base seed of the K-means splits.

    ``train.pixel_opt`` / ``perceptual_opt`` are optional extra terms (added when set).
    """

    def __init__(self, opt):
        super().__init__(opt)
        bare = self.get_bare_model(self.net_g)
        encoder = getattr(bare, 'degradation_encoder', None)
        if encoder is None:
            raise ValueError(f"AMIRNetModel needs a tree-conditioned network_g (AMIRNet, ConditionedNAFNet, "
                             f"ConditionedRestormer, ConditionedPromptIR); got type '{opt['network_g']['type']}'.")
        train_opt = opt.get('train') or {}
        seed = train_opt.get('tree_seed', opt.get('manual_seed') or 0)
        self.tree = DegradationTree(encoder.branching, encoder.depth, seed=int(seed))
        self.tree_output = None
        self._tree_dataset = None
        if self.is_train:
            self._read_tree_options(train_opt)
            self._set_active_levels(self.tree.num_levels)

    # ------------------------------------------------------------------ set-up
    def _read_tree_options(self, train_opt):
        split = train_opt.get('tree_split_iters')
        if split is None or int(split) <= 0:
            raise ValueError('AMIRNetModel needs train.tree_split_iters (a positive number of iterations between '
                             'tree levels).')
        self.tree_split_iters = int(split)
        self.tree_passes = int(train_opt.get('tree_passes', 5))
        self.tree_batch_size = int(train_opt.get('tree_batch_size', 32))
        train_set = (self.opt.get('datasets') or {}).get('train') or {}
        self.tree_num_workers = int(train_opt.get('tree_num_workers', max(1, train_set.get('num_worker_per_gpu', 0))))
        max_samples = train_opt.get('tree_max_samples')
        self.tree_max_samples = None if max_samples is None else int(max_samples)
        self.tree_feature = train_opt.get('tree_feature', 'pred')
        if self.tree_feature not in TREE_FEATURES:
            raise ValueError(f"train.tree_feature must be one of {TREE_FEATURES}, got '{self.tree_feature}'.")
        self.tree_kmeans = train_opt.get('tree_kmeans', 'torch')
        self.tree_kmeans_n_init = int(train_opt.get('tree_kmeans_n_init', 10))
        if self.tree_passes < 1 or self.tree_batch_size < 1:
            raise ValueError('train.tree_passes and train.tree_batch_size must be >= 1.')
        total = train_opt.get('total_iter')
        last_split = (self.tree.depth - 1) * self.tree_split_iters
        if total is not None and last_split > int(total):
            get_root_logger().warning(
                f'train.tree_split_iters={self.tree_split_iters}: the last tree level would be built at iteration '
                f'{last_split}, after train.total_iter={int(total)}; the tree will not reach its '
                f'{self.tree.depth} levels.')

    def setup_losses(self):
        """Read the AMIRNet loss weights; ``pixel_opt``/``perceptual_opt`` are optional extras."""
        train_opt = self.opt['train']
        if train_opt.get('pixel_opt') or train_opt.get('perceptual_opt'):
            super().setup_losses()
        else:
            self.cri_pix = self.cri_perceptual = None
        self.smooth_l1_weight = float(train_opt.get('smooth_l1_weight', 0.85))
        self.smooth_l1_beta = float(train_opt.get('smooth_l1_beta', 0.03))
        self.ssim_weight = float(train_opt.get('ssim_weight', 0.15))
        self.clamp_output = bool(train_opt.get('clamp_output', True))
        self.tree_ce_weight = float(train_opt.get('tree_ce_weight', 1.0))

    def _set_active_levels(self, levels):
        for name in ('net_g', 'net_g_ema'):
            if hasattr(self, name):
                self.get_bare_model(getattr(self, name)).set_active_levels(levels)

    def model_ema(self, decay=0.999):
        """Average parameters like BasicSR, and copy buffers (BatchNorm statistics, ``active_levels``).

        BasicSR's EMA only averages parameters; the degradation encoder's BatchNorm running
        statistics would otherwise stay at their initial values in ``net_g_ema``.
        """
        super().model_ema(decay)
        net_g = self.get_bare_model(self.net_g)
        ema_buffers = dict(self.net_g_ema.named_buffers())
        with torch.no_grad():
            for name, buf in net_g.named_buffers():
                if name in ema_buffers:
                    ema_buffers[name].copy_(buf)

    # ---------------------------------------------------------------- forward
    def net_forward(self, net, lq):
        """Run the network and keep its tree outputs in ``self.tree_output``.

        In eval mode the bare network is called: BasicSR validates on rank 0 only, and a
        DDP forward would try to broadcast the encoder's BatchNorm buffers to ranks that
        are not there.
        """
        if not net.training:
            net = self.get_bare_model(net)
        out = net(lq, return_tree=True)
        if isinstance(out, tuple):
            out, self.tree_output = out
        return out

    @staticmethod
    def batch_keys(data):
        """Tree keys of a batch: the stable sample ``key`` (or BasicSR's ``gt_path``), plus the noise level.

        A sample whose ``sigma`` > 0 (synthetic denoising, where the same clean image is
        used at several noise levels) gets ``'<key>@sigma<σ>'``, so every noise level of an
        image is its own tree sample.

        Returns:
            list[str]: One key per sample.

        Raises:
            KeyError: The batch has neither ``key`` nor ``gt_path``.
        """
        for name in ('key', 'gt_path'):
            if name in data:
                keys = data[name]
                keys = [keys] if isinstance(keys, str) else [str(k) for k in keys]
                break
        else:
            raise KeyError("AMIRNetModel needs a stable per-sample 'key' (or 'gt_path') in every training batch to "
                           f'store tree pseudo-labels; the batch has only {sorted(data)}. Use AllInOneDataset or a '
                           'paired dataset.')
        sigma = data.get('sigma')
        if torch.is_tensor(sigma):
            keys = [f'{k}@sigma{s:g}' if s > 0 else k for k, s in zip(keys, sigma.reshape(-1).tolist())]
        return keys

    def compute_losses(self, output):
        """Restoration loss on the clamped output + per-level cross-entropy against the pseudo-labels.

        Returns:
            tuple[Tensor, OrderedDict[str, Tensor]]: Total and the terms ``l_smooth_l1``,
            ``l_ssim``, ``l_ce`` (sum over built levels below the root) and ``l_ce_<level>``,
            plus ``l_pix``/``l_percep`` when configured.
        """
        if self.cri_pix or self.cri_perceptual:
            l_total, loss_dict = super().compute_losses(output)
        else:
            l_total, loss_dict = 0, OrderedDict()
        out = output.float()
        out = out.clamp(0, 1) if self.clamp_output else out
        gt = self.gt.float()
        if self.smooth_l1_weight:
            loss_dict['l_smooth_l1'] = self.smooth_l1_weight * F.smooth_l1_loss(out, gt, beta=self.smooth_l1_beta)
            l_total = l_total + loss_dict['l_smooth_l1']
        if self.ssim_weight:
            loss_dict['l_ssim'] = self.ssim_weight * (1 - ssim(out, gt))
            l_total = l_total + loss_dict['l_ssim']
        if self.tree_ce_weight and self.tree.num_levels > 1:
            logits = self.tree_output['logits']
            keys = self.batch_keys(self.data)
            l_ce = 0
            for level in range(1, self.tree.num_levels):
                labels = self.tree.labels_for(keys, level, device=logits[level].device)
                level_logits = logits[level].float()
                if bool((labels >= 0).any()):
                    term = F.cross_entropy(level_logits, labels, ignore_index=-1)
                else:  # no labelled sample in this batch: a zero that keeps the graph
                    term = level_logits.sum() * 0.0
                loss_dict[f'l_ce_{level}'] = term
                l_ce = l_ce + term
            loss_dict['l_ce'] = self.tree_ce_weight * l_ce
            l_total = l_total + loss_dict['l_ce']
        return l_total, loss_dict

    def optimize_parameters(self, current_iter):
        """Grow the tree when its iteration comes, then take the usual training step."""
        self.maybe_grow_tree(current_iter)
        super().optimize_parameters(current_iter)

    # ------------------------------------------------------------ tree growth
    def maybe_grow_tree(self, current_iter):
        """Build the next level if ``current_iter >= num_levels * tree_split_iters``.

        Returns:
            bool: Whether a level was built.
        """
        if self.tree.is_complete or current_iter < self.tree.num_levels * self.tree_split_iters:
            return False
        self.grow_tree(current_iter)
        return True

    def _training_set(self):
        if self._tree_dataset is None:
            dataset_opt = (self.opt.get('datasets') or {}).get('train')
            if not dataset_opt:
                raise ValueError('AMIRNetModel grows its tree from datasets.train, which is not configured.')
            dataset_opt = dict(dataset_opt)
            dataset_opt.setdefault('phase', 'train')
            dataset_opt.setdefault('scale', self.opt.get('scale', 1))
            self._tree_dataset = build_dataset(dataset_opt)
        return self._tree_dataset

    def _tree_loader(self):
        dataset = self._training_set()
        n = len(dataset)
        if n == 0:
            raise ValueError('datasets.train is empty: cannot grow the degradation tree.')
        if self.tree_max_samples is not None and self.tree_max_samples < n:
            indices = torch.linspace(0, n - 1, self.tree_max_samples).round().long().unique().tolist()
        else:
            indices = list(range(n))
        rank, world_size = get_dist_info()
        shard = indices[rank::world_size]
        return DataLoader(Subset(dataset, shard), batch_size=self.tree_batch_size, shuffle=False,
                          num_workers=self.tree_num_workers, drop_last=False)

    @torch.no_grad()
    def extract_tree_features(self):
        """Average (degraded - clean) features per sample key over ``tree_passes`` passes (this rank's shard).

        Returns:
            tuple[list[str], Tensor, Tensor]: keys, (N, D) float64 feature sums and (N,)
            counts (sums rather than means so that ranks can be merged exactly).
        """
        encoder = self.get_bare_model(self.net_g).degradation_encoder
        was_training = encoder.training
        encoder.eval()
        sums, counts = {}, {}
        loader = self._tree_loader()
        try:
            for _ in range(self.tree_passes):
                for batch in loader:
                    keys = self.batch_keys(batch)
                    batch = {k: (v.to(self.device) if torch.is_tensor(v) else v) for k, v in batch.items()}
                    if 'sigma' in batch:
                        from perceive_ir_plugin.data.degradations import apply_pending_noise
                        batch = apply_pending_noise(batch)
                    if 'gt' not in batch:
                        raise KeyError('Growing the degradation tree needs paired training data (lq and gt).')
                    paths = torch.tensor([self.tree.path(k) for k in keys], dtype=torch.long, device=self.device)
                    feats = encoder.tree_features(batch['lq'], batch['gt'], paths, mode=self.tree_feature)
                    for key, feat in zip(keys, feats.double().cpu()):
                        if key in sums:
                            sums[key] += feat
                            counts[key] += 1
                        else:
                            sums[key] = feat.clone()
                            counts[key] = 1
        finally:
            encoder.train(was_training)
        keys = sorted(sums)
        if not keys:
            return [], torch.zeros(0, 0, dtype=torch.float64), torch.zeros(0, dtype=torch.float64)
        return keys, torch.stack([sums[k] for k in keys]), torch.tensor([counts[k] for k in keys], dtype=torch.float64)

    def grow_tree(self, current_iter):
        """Extract features, split every leaf (rank 0) and share the new tree with all ranks."""
        logger = get_root_logger()
        keys, sums, counts = self.extract_tree_features()
        rank, world_size = get_dist_info()
        if world_size > 1:
            gathered = [None] * world_size
            torch.distributed.all_gather_object(gathered, (keys, sums, counts))
            merged_sums, merged_counts = {}, {}
            for r_keys, r_sums, r_counts in gathered:
                for key, s, c in zip(r_keys, r_sums, r_counts):
                    merged_sums[key] = merged_sums[key] + s if key in merged_sums else s
                    merged_counts[key] = merged_counts.get(key, 0) + c
            keys = sorted(merged_sums)
            sums = torch.stack([merged_sums[k] for k in keys])
            counts = torch.stack([torch.as_tensor(merged_counts[k], dtype=torch.float64) for k in keys])
        entry = None
        if rank == 0:
            entry = self.tree.grow(keys, sums / counts[:, None], backend=self.tree_kmeans,
                                   n_init=self.tree_kmeans_n_init, current_iter=current_iter)
        if world_size > 1:
            payload = [self.tree.state_dict() if rank == 0 else None]
            torch.distributed.broadcast_object_list(payload, src=0)
            if rank != 0:
                self.tree.load_state_dict(payload[0])
                entry = self.tree.history[-1]
        self._set_active_levels(self.tree.num_levels)
        logger.info(f"Degradation tree: built level {entry['level']} at iteration {current_iter} from "
                    f"{entry['num_samples']} samples x {self.tree_passes} pass(es); node sizes {entry['node_sizes']}"
                    + (f", {entry['unplaced']} sample(s) without a parent node" if entry['unplaced'] else '') + '.')

    # ------------------------------------------------------------ persistence
    def extra_training_state(self):
        """Adds the tree (``degradation_tree``) to the training state."""
        extra = super().extra_training_state()
        extra['degradation_tree'] = self.tree.state_dict()
        return extra

    def load_extra_training_state(self, state):
        """Restores the tree and the number of active levels."""
        super().load_extra_training_state(state)
        if 'degradation_tree' not in state:
            raise KeyError('This training state has no degradation_tree: it was not written by AMIRNetModel, so the '
                           'pseudo-labels cannot be restored.')
        self.tree.load_state_dict(state['degradation_tree'])
        self._set_active_levels(self.tree.num_levels)
