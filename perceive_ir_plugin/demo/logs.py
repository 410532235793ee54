"""Capture BasicSR's log of one pipeline run and read losses and metrics back from it.

BasicSR 1.4.2 configures its ``basicsr`` logger once per process (``get_root_logger``
returns the first configuration afterwards), so when several pipelines run in one process
only the first would get its own log file. :func:`capture_basicsr_log` therefore attaches
a handler of its own for the duration of one run: it writes that run's records to a log
file, keeps them in memory for parsing, mutes BasicSR's console output (the demo shows
progress bars instead) and advances an optional progress bar on every training log line.
"""
import logging
import math
import re
from contextlib import contextmanager

_TRAIN_HEAD = re.compile(r'\[epoch:\s*(?P<epoch>\d+), iter:\s*(?P<iter>[\d,]+), lr:\((?P<lr>[^)]*)\)\]')
_KEY_VALUE = re.compile(r'(?P<key>[A-Za-z_][\w]*): (?P<value>[-+]?(?:\d+\.?\d*(?:[eE][-+]?\d+)?|nan|inf))')
_VAL_HEAD = re.compile(r'^Validation (?P<name>.+)$')
_VAL_METRIC = re.compile(r'# (?P<key>[\w.-]+): (?P<value>[-+]?(?:\d+\.?\d*(?:[eE][-+]?\d+)?|nan|inf))')
FORMAT = '%(asctime)s %(levelname)s: %(message)s'


def _float(text):
    return float(text) if text not in ('nan', 'inf', '-inf', '+inf') else float(text.lstrip('+'))


def parse_train_line(message):
    """Parse one line of BasicSR's ``MessageLogger``.

    Args:
        message (str): e.g. ``[Perce..][epoch:  0, iter:       3, lr:(2.000e-04,)] [eta: 0:00:01, time (data):
            0.512 (0.004)] l_pix: 1.2345e-01 l_cl: 2.0e+00``.

    Returns:
        dict | None: ``{'iter': int, 'epoch': int, 'lr': float, <loss name>: float, ...}``,
        or None when the line is not a training log line.
    """
    head = _TRAIN_HEAD.search(message)
    if head is None:
        return None
    record = {'iter': int(head.group('iter').replace(',', '')), 'epoch': int(head.group('epoch'))}
    lrs = [v for v in head.group('lr').split(',') if v.strip()]
    if lrs:
        record['lr'] = float(lrs[0])
    tail = message[message.rfind(']') + 1:]
    for match in _KEY_VALUE.finditer(tail):
        record[match.group('key')] = _float(match.group('value'))
    return record


def parse_train_log(messages):
    """Loss curves from training log messages.

    Args:
        messages (Iterable[str]): Log messages (one record each, as captured).

    Returns:
        dict[str, list[float]]: ``iter`` and one list per logged quantity (``l_pix``,
        ``l_cl``, ...), aligned with ``iter``; a quantity missing on a line gets NaN.
    """
    rows = [r for r in (parse_train_line(m) for m in messages) if r is not None]
    keys = []
    for row in rows:
        keys.extend(k for k in row if k not in keys and k not in ('iter', 'epoch'))
    curves = {'iter': [r['iter'] for r in rows]}
    for key in keys:
        curves[key] = [float(r.get(key, math.nan)) for r in rows]
    return curves


def parse_validation_log(messages):
    """Metrics of BasicSR's ``Validation <dataset>`` records.

    Args:
        messages (Iterable[str]): Log messages.

    Returns:
        dict[str, dict[str, float]]: dataset name → metric name → value (the last record
        of a dataset wins).
    """
    results = {}
    for message in messages:
        lines = message.strip('\n').split('\n')
        head = _VAL_HEAD.match(lines[0].strip()) if lines else None
        if head is None:
            continue
        metrics = {}
        for line in lines[1:]:
            match = _VAL_METRIC.search(line)
            if match:
                metrics[match.group('key')] = _float(match.group('value'))
        results[head.group('name').strip()] = metrics
    return results


class _CaptureHandler(logging.Handler):

    def __init__(self, stream, progress):
        super().__init__(logging.INFO)
        self.stream = stream
        self.progress = progress
        self.messages = []
        self.setFormatter(logging.Formatter(FORMAT))

    def emit(self, record):
        try:
            message = record.getMessage()
            self.messages.append(message)
            if self.stream is not None:
                self.stream.write(self.format(record) + '\n')
                self.stream.flush()
            if self.progress is not None:
                parsed = parse_train_line(message)
                if parsed is not None and parsed['iter'] > self.progress.n:
                    self.progress.update(parsed['iter'] - self.progress.n)
                    losses = {k: v for k, v in parsed.items() if k.startswith('l_')}
                    if losses:
                        self.progress.set_postfix({k: f'{v:.3g}' for k, v in list(losses.items())[:3]},
                                                  refresh=False)
        except Exception:  # noqa: BLE001 -- logging must never break the run
            self.handleError(record)


@contextmanager
def capture_basicsr_log(log_path=None, progress=None, quiet=True):
    """Record everything the ``basicsr`` logger emits while the block runs.

    Args:
        log_path (str, optional): File that receives the formatted records.
        progress (tqdm, optional): Progress bar advanced to the ``iter`` of every training
            log line (set its ``total`` to the number of iterations).
        quiet (bool): Mute BasicSR's console handler (WARNING and above still show).

    Yields:
        list[str]: The captured messages (filled while the block runs).
    """
    from basicsr.utils import get_root_logger

    logger = get_root_logger()  # make sure BasicSR's own set-up has happened (it adds a console handler)
    stream = open(log_path, 'w', encoding='utf-8') if log_path else None  # noqa: SIM115
    handler = _CaptureHandler(stream, progress)
    saved_level = logger.level
    muted = []
    if quiet:
        for h in logger.handlers:
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
                muted.append((h, h.level))
                h.setLevel(max(h.level, logging.WARNING))
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        yield handler.messages
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved_level)
        for h, level in muted:
            h.setLevel(level)
        if stream is not None:
            stream.close()
