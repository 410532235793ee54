"""Stage-1 training of Perceive-IR's quality prompts (three tiers, cross-entropy)."""
import os
from collections import OrderedDict

import torch
import torch.nn.functional as F

from basicsr.metrics import calculate_metric
from basicsr.utils import get_root_logger
from basicsr.utils.dist_util import master_only
from basicsr.utils.registry import MODEL_REGISTRY
from perceive_ir_plugin.archs.quality_perceiver_arch import QualityPerceiver
from perceive_ir_plugin.models.image_restoration_model import ImageRestorationModel

TIER_KEYS = ('lq', 'medium', 'gt')  # low, medium, high in QualityTripletDataset batches


@MODEL_REGISTRY.register()
class QualityPromptModel(ImageRestorationModel):
    """Learns the quality prompts of a :class:`QualityPerceiver` (``network_g``).

    A batch of B triplets (``lq`` = low, ``medium``, ``gt`` = high, from
    ``QualityTripletDataset``) becomes one 3B batch ``[low; medium; high]`` with labels
    0 / 1 / 2 (terrible / mediocre / excellent); the loss is the cross-entropy of the
    perceiver's logits (CLIP logit scale · cosine). Only the prompt context is trained
    (AdamW, ``train.optim_g``), through the inherited training step (autocast, gradient
    clipping, non-finite skipping, schedulers).

    Checkpoints: ``models/net_g_<iter>.pth`` holds ``{'params': prompt_learner.*}`` only
    (the frozen CLIP comes from ``network_g.clip_weights``), and
    ``models/quality_prompts_<iter>.pth`` is the stand-alone prompts file for
    ``QualityPerceiver(prompt_weights=...)`` / the stage-2 CLIP loss. Both load back through
    ``path.pretrain_network_g`` (and BasicSR's resume).

    Validation (``val.metrics`` with the functions of ``metrics/quality_metric.py``):
    every metric is computed over all validation triplets (name as configured) and per
    task (``<name>_<task>``), from the softmax of the logits (averaged over the five crops
    when the dataset has ``five_crop: true``); results are logged and sent to TensorBoard
    like BasicSR's (``metrics/<dataset>/<name>``) with best-value tracking.

    Extra option: ``train.label_smoothing`` (float, default 0) for the cross-entropy.
    """

    def __init__(self, opt):
        super().__init__(opt)
        if not self.is_train:
            self.get_bare_model(self.net_g).freeze()

    # ------------------------------------------------------------------ set-up
    def _perceiver(self, net=None):
        bare = self.get_bare_model(self.net_g if net is None else net)
        if not isinstance(bare, QualityPerceiver):
            raise TypeError(f'QualityPromptModel needs network_g.type QualityPerceiver, got {type(bare).__name__}.')
        return bare

    def init_training_settings(self):
        """Make the prompt context trainable (also when started from a prompts file), then set up as usual."""
        self._perceiver().unfreeze()
        super().init_training_settings()

    def setup_losses(self):
        """Cross-entropy over the quality tiers (``train.label_smoothing``, default 0)."""
        self.cri_ce = torch.nn.CrossEntropyLoss(label_smoothing=float(self.opt['train'].get('label_smoothing', 0.0)))

    # --------------------------------------------------------------- data / forward
    def feed_data(self, data):
        """Set ``self.lq`` to the 3B batch ``[low; medium; high]`` and ``self.labels`` to its tiers.

        Args:
            data (dict): ``lq``, ``medium``, ``gt`` of shape (B, 3, S, S) — or (B, K, 3, S, S)
                with K crops per image (validation) — RGB in [0, 1], plus ``task_name`` etc.
        """
        missing = [k for k in TIER_KEYS if k not in data]
        if missing:
            raise KeyError(f'QualityPromptModel needs batches with {list(TIER_KEYS)} (low/medium/high, e.g. from '
                           f'QualityTripletDataset); missing {missing}.')
        super().feed_data(data)
        tiers = [self.data[k] for k in TIER_KEYS]
        self.batch_size = tiers[0].shape[0]
        self.n_crops = tiers[0].shape[1] if tiers[0].dim() == 5 else 1
        self.lq = torch.cat([t.reshape(-1, *t.shape[-3:]) for t in tiers], dim=0)
        self.labels = torch.arange(len(TIER_KEYS), device=self.lq.device).repeat_interleave(self.batch_size)

    def _crop_mean(self, logits):
        if self.n_crops == 1:
            return logits
        return logits.reshape(-1, self.n_crops, logits.shape[-1]).mean(dim=1)

    def compute_losses(self, output):
        """Cross-entropy of the (3B, 3) logits against the tiers; also logs the batch accuracy.

        Returns:
            tuple[Tensor, OrderedDict]: ``l_ce`` and the log entries ``l_ce``, ``acc``.
        """
        logits = self._crop_mean(output).float()
        l_ce = self.cri_ce(logits, self.labels)
        acc = (logits.detach().argmax(dim=-1) == self.labels).float().mean()
        return l_ce, OrderedDict([('l_ce', l_ce), ('acc', acc)])

    def test(self):
        """Eval-mode, no-grad logits of ``self.lq`` → ``self.output`` (3B, C), averaged over crops."""
        net = self.net_g_ema if hasattr(self, 'net_g_ema') else self.net_g
        was_training = net.training
        net.eval()
        with torch.no_grad():
            self.output = self._crop_mean(self.net_forward(net, self.lq))
        if was_training:
            net.train()

    # ------------------------------------------------------------------ validation
    def nondist_validation(self, dataloader, current_iter, tb_logger, save_img):
        """Per-tier accuracy, strict-triplet and monotonic-ordering rates, overall and per task."""
        dataset_name = dataloader.dataset.opt['name']
        metrics_opt = self.opt['val'].get('metrics') or {}
        if save_img:
            get_root_logger().info('QualityPromptModel: val.save_img has no images to save (classification).')
        probs, task_names = [], []
        for val_data in dataloader:
            self.feed_data(val_data)
            self.test()
            p = F.softmax(self.output.float(), dim=-1).reshape(len(TIER_KEYS), self.batch_size, -1)
            probs.append(p.permute(1, 0, 2).cpu())
            names = val_data.get('task_name', ['all'] * self.batch_size)
            task_names.extend([names] if isinstance(names, str) else list(names))
            del self.lq, self.output
        if not probs or not metrics_opt:
            return
        probs = torch.cat(probs)
        tasks = list(dict.fromkeys(task_names))
        results = OrderedDict()
        for name, metric_opt in metrics_opt.items():
            results[name] = float(calculate_metric({'probs': probs}, metric_opt))
        for task in tasks:
            index = torch.tensor([t == task for t in task_names])
            for name, metric_opt in metrics_opt.items():
                results[f'{name}_{task}'] = float(calculate_metric({'probs': probs[index]}, metric_opt))
        self.metric_results = results
        self._initialize_best_metric_results(dataset_name)
        record = self.best_metric_results[dataset_name]
        for name, value in results.items():
            if name not in record:
                better = metrics_opt[name.rsplit('_', 1)[0] if name not in metrics_opt else name].get('better',
                                                                                                       'higher')
                record[name] = dict(better=better, val=float('-inf') if better == 'higher' else float('inf'), iter=-1)
            self._update_best_metric_result(dataset_name, name, value, current_iter)
        self._log_validation_metric_values(current_iter, dataset_name, tb_logger)

    # ------------------------------------------------------------------ saving / loading
    def network_state_to_save(self, net):
        """Only ``prompt_learner.*`` is written; the frozen CLIP comes from ``network_g.clip_weights``."""
        state = self._perceiver(net).prompt_learner.state_dict()
        return OrderedDict((f'prompt_learner.{k}', v.detach().cpu()) for k, v in state.items())

    def save(self, epoch, current_iter):
        """Save the network file and training state (inherited), then the prompts file."""
        super().save(epoch, current_iter)
        self.save_prompts(current_iter)

    @master_only
    def save_prompts(self, current_iter):
        """Write ``models/quality_prompts_<iter>.pth`` (see :meth:`QualityPerceiver.prompt_checkpoint`)."""
        label = 'latest' if current_iter == -1 else current_iter
        path = os.path.join(self.opt['path']['models'], f'quality_prompts_{label}.pth')
        train_set = (self.opt.get('datasets') or {}).get('train') or {}
        net = self.net_g_ema if hasattr(self, 'net_g_ema') else self.net_g
        meta = {'iteration': int(self.current_iter if current_iter == -1 else current_iter),
                'task_balanced': bool(train_set.get('balance_tasks', True)),
                'batch_size_per_gpu': train_set.get('batch_size_per_gpu'),
                'world_size': int(self.opt.get('world_size', 1))}
        return self._save_with_retries(self._perceiver(net).prompt_checkpoint(**meta), path)

    def load_network(self, net, load_path, strict=True, param_key='params'):
        """Load prompts (a prompts file or a ``net_g`` file of this model) into a QualityPerceiver."""
        bare = self.get_bare_model(net)
        if not isinstance(bare, QualityPerceiver):
            return super().load_network(net, load_path, strict, param_key)
        option_key = self._option_key_for(load_path) or 'path.pretrain_network_g'
        meta = bare.load_prompts(load_path, option_key=option_key)
        get_root_logger().info(f'Loaded quality prompts from {load_path}'
                               + (f" (iteration {meta['iteration']})" if 'iteration' in meta else '') + '.')
        return None
