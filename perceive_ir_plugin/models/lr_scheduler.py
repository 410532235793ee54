"""Learning-rate schedules used by the backbones' official recipes, per iteration.

BasicSR steps every scheduler once per iteration (from iteration 2 on; see
``BaseModel.update_learning_rate``), so ``last_epoch`` below counts iterations. All
schedules here are closed-form functions of ``last_epoch`` and the initial learning
rates, so BasicSR's linear warm-up (which overwrites ``param_group['lr']``) and resuming
from a saved state cannot make them drift. Their state dicts hold plain numbers and
lists only and load with ``torch.load(..., weights_only=True)``.
"""
import bisect
import math

try:
    from torch.optim.lr_scheduler import LRScheduler
except ImportError:  # torch < 2.0
    from torch.optim.lr_scheduler import _LRScheduler as LRScheduler


class _ClosedFormLR(LRScheduler):
    """Base class: ``lr = lr_at(initial_lr, last_epoch)`` for every parameter group."""

    def lr_at(self, base_lr, t):  # pragma: no cover - abstract
        raise NotImplementedError

    def get_lr(self):
        return [self.lr_at(base_lr, self.last_epoch) for base_lr in self.base_lrs]

    def _get_closed_form_lr(self):
        return self.get_lr()


def _cosine(start, end, t, period):
    """Half cosine from ``start`` (t=0) to ``end`` (t=period)."""
    return end + 0.5 * (start - end) * (1 + math.cos(math.pi * t / period))


class CosineAnnealingRestartCyclicLR(_ClosedFormLR):
    """Cosine annealing with restarts and one minimum per cycle (Restormer's schedule).

    Cycle ``i`` lasts ``periods[i]`` iterations and anneals from
    ``restart_weights[i] * initial_lr`` down to ``eta_mins[i]``. With Restormer's
    ``periods=[92000, 208000]``, ``restart_weights=[1, 1]``, ``eta_mins=[3e-4, 1e-6]``
    and ``lr=3e-4`` the rate stays at 3e-4 for 92k iterations, then follows a cosine to
    1e-6 over 208k. After the last cycle the rate stays at ``eta_mins[-1]``.

    Args:
        optimizer (torch.optim.Optimizer): Wrapped optimizer.
        periods (list[int]): Length of each cycle in iterations (> 0).
        restart_weights (list[float]): Weight of the initial rate at each cycle start.
            Default: ``[1]``.
        eta_mins (list[float]): Minimum rate of each cycle. Default: ``[0]``.
        last_epoch (int): Index of the last iteration (-1 to start). Default: -1.
    """

    def __init__(self, optimizer, periods, restart_weights=(1, ), eta_mins=(0, ), last_epoch=-1):
        self.periods = [int(p) for p in periods]
        self.restart_weights = [float(w) for w in restart_weights]
        self.eta_mins = [float(e) for e in eta_mins]
        if not (len(self.periods) == len(self.restart_weights) == len(self.eta_mins)):
            raise ValueError('CosineAnnealingRestartCyclicLR: train.scheduler.periods, restart_weights and '
                             f'eta_mins must have the same length; got {len(self.periods)}, '
                             f'{len(self.restart_weights)} and {len(self.eta_mins)}.')
        if not self.periods or min(self.periods) <= 0:
            raise ValueError('CosineAnnealingRestartCyclicLR: train.scheduler.periods must be positive, '
                             f'got {periods}.')
        self.cumulative_period = [sum(self.periods[:i + 1]) for i in range(len(self.periods))]
        super().__init__(optimizer, last_epoch)

    def lr_at(self, base_lr, t):
        if t >= self.cumulative_period[-1]:
            return self.eta_mins[-1]
        idx = bisect.bisect_left(self.cumulative_period, t)  # first cycle whose end is >= t
        start = 0 if idx == 0 else self.cumulative_period[idx - 1]
        return _cosine(self.restart_weights[idx] * base_lr, self.eta_mins[idx], t - start, self.periods[idx])


class TrueCosineAnnealingLR(_ClosedFormLR):
    """Single cosine from the initial rate to ``eta_min`` over ``T_max`` iterations.

    Equal to ``torch.optim.lr_scheduler.CosineAnnealingLR`` for ``t <= T_max`` (NAFNet's
    ``TrueCosineAnnealingLR``; option names ``TrueCosineAnnealingLR`` and
    ``CosineAnnealingLR`` both build it). Unlike torch's, the rate stays at ``eta_min``
    after ``T_max`` instead of rising again.

    Args:
        optimizer (torch.optim.Optimizer): Wrapped optimizer.
        T_max (int): Iterations of the cosine (> 0).
        eta_min (float): Final rate. Default: 0.
        last_epoch (int): Index of the last iteration (-1 to start). Default: -1.
    """

    def __init__(self, optimizer, T_max, eta_min=0, last_epoch=-1):  # noqa: N803 (torch's name)
        if int(T_max) <= 0:
            raise ValueError(f'TrueCosineAnnealingLR: train.scheduler.T_max must be positive, got {T_max}.')
        self.T_max = int(T_max)
        self.eta_min = float(eta_min)
        super().__init__(optimizer, last_epoch)

    def lr_at(self, base_lr, t):
        return _cosine(base_lr, self.eta_min, min(t, self.T_max), self.T_max)


class LinearWarmupCosineAnnealingLR(_ClosedFormLR):
    """Linear warm-up followed by a cosine (PromptIR's schedule, counted in iterations).

    Same formula as the ``LinearWarmupCosineAnnealingLR`` that PromptIR copies from
    lightning-bolts, with iterations in place of epochs: for ``t < warmup_iters`` the rate
    is ``warmup_start_lr + t * (lr - warmup_start_lr) / max(1, warmup_iters - 1)``; then
    ``eta_min + (lr - eta_min) * (1 + cos(pi * (t - warmup_iters) / (max_iters -
    warmup_iters))) / 2``, held at ``eta_min`` after ``max_iters``.

    Args:
        optimizer (torch.optim.Optimizer): Wrapped optimizer.
        warmup_iters (int): Length of the linear warm-up (>= 0).
        max_iters (int): Iteration at which the cosine reaches ``eta_min`` (> warmup_iters).
        warmup_start_lr (float): Rate at iteration 0. Default: 0.
        eta_min (float): Final rate. Default: 0.
        last_epoch (int): Index of the last iteration (-1 to start). Default: -1.
    """

    def __init__(self, optimizer, warmup_iters, max_iters, warmup_start_lr=0.0, eta_min=0.0, last_epoch=-1):
        self.warmup_iters = int(warmup_iters)
        self.max_iters = int(max_iters)
        if self.warmup_iters < 0 or self.max_iters <= self.warmup_iters:
            raise ValueError('LinearWarmupCosineAnnealingLR: need 0 <= train.scheduler.warmup_iters < max_iters; '
                             f'got warmup_iters={warmup_iters}, max_iters={max_iters}.')
        self.warmup_start_lr = float(warmup_start_lr)
        self.eta_min = float(eta_min)
        super().__init__(optimizer, last_epoch)

    def lr_at(self, base_lr, t):
        if t < self.warmup_iters:
            return self.warmup_start_lr + t * (base_lr - self.warmup_start_lr) / max(1, self.warmup_iters - 1)
        span = self.max_iters - self.warmup_iters
        return _cosine(base_lr, self.eta_min, min(t - self.warmup_iters, span), span)
