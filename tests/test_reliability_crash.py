"""Fault injection: SIGKILL a tiny CPU training run at random moments (also mid-save) and auto-resume it.

Each run is the real entry point ``perceive_ir_plugin.train.main(['-opt', X, '--auto_resume'])``. To keep the
test fast, the runs are forked from one "zygote" process that has imported torch, BasicSR and the plugin once
(a fresh interpreter costs several CPU seconds per start on this machine); the test process sends SIGKILL to
the forked training process itself. For kills during saving, the child slows checkpoint writes down inside
``utils/atomic_io.atomic_write`` (content written into the temporary file, optionally only half of it, then a
pause before fsync + rename) so that the kill provably lands while a temporary file exists.
"""
import glob
import io
import json
import os
import random
import re
import signal
import subprocess
import sys
import time

import cv2
import numpy as np
import pytest
import yaml

from basicsr.archs import build_network

from perceive_ir_plugin.utils.checkpoint import load_checkpoint_file

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_NAFNET = os.path.join(REPO, 'options', 'tiny', 'NAFNet_train_tiny.yml')
TOTAL_ITER = 24
NAME = 'crash_tiny'


# ----------------------------------------------------------------------------------- zygote side
def _stall_save(index, fraction, marker):
    """Freeze inside the ``index``-th atomic write of this process (0-based) until killed.

    The temporary file then holds ``fraction`` (0, 0.5 or 1) of its content and has not been
    fsync-ed or renamed over its destination; every other write is untouched. The file
    ``marker`` is created when the stall begins.
    """
    from perceive_ir_plugin.utils import atomic_io
    original = atomic_io.atomic_write
    count = [0]

    def stalling_atomic_write(path, write_fn, mode='wb'):
        this, count[0] = count[0], count[0] + 1
        if this != index:
            return original(path, write_fn, mode)

        def write_then_stall(f):
            buf = io.BytesIO()
            write_fn(buf)
            data = buf.getvalue()
            f.write(data[:int(len(data) * fraction)])
            f.flush()
            open(marker, 'w').close()
            time.sleep(120)  # the test kills us here
            f.write(data[int(len(data) * fraction):])

        return original(path, write_then_stall, mode)

    atomic_io.atomic_write = stalling_atomic_write


def _child(job):
    """In the forked child: redirect output, inject faults, run training, never return."""
    code = 1
    try:
        fd = os.open(job['log'], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.chdir(job['cwd'])
        import torch
        torch.set_num_threads(1)
        if job.get('stall_at') is not None:
            _stall_save(job['stall_at'], job['fraction'], job['log'] + '.stalled')
        from perceive_ir_plugin.train import main
        code = main(job['argv'])
    except BaseException:  # noqa: BLE001 -- reported through the log and the exit code
        import traceback
        traceback.print_exc()
        code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def zygote_main():
    """Import everything once, then fork one training process per JSON line read from stdin.

    Protocol: a job line ``{"cwd", "argv", "log", "slow_save", "half"}`` answers ``{"pid"}``; a line
    ``{"wait": pid}`` reaps that child and answers ``{"status": waitpid status}``.
    """
    import perceive_ir_plugin  # noqa: F401
    import basicsr.train  # noqa: F401
    from perceive_ir_plugin import train  # noqa: F401
    print(json.dumps({'ready': True}), flush=True)
    for line in sys.stdin:
        job = json.loads(line)
        if 'wait' in job:
            _, status = os.waitpid(job['wait'], 0)
            print(json.dumps({'status': status}), flush=True)
            continue
        pid = os.fork()
        if pid == 0:
            _child(job)
        print(json.dumps({'pid': pid}), flush=True)


# ------------------------------------------------------------------------------------- test side
class Zygote:

    def __init__(self):
        env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=os.pathsep.join([REPO, os.path.dirname(__file__)]))
        self.proc = subprocess.Popen(
            [sys.executable, '-c', 'import test_reliability_crash as t; t.zygote_main()'],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=REPO)
        assert json.loads(self.proc.stdout.readline()) == {'ready': True}

    def ask(self, message):
        self.proc.stdin.write(json.dumps(message) + '\n')
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


def make_folders(root):
    rng = np.random.default_rng(0)
    for sub in ('gt', 'lq'):
        os.makedirs(os.path.join(root, 'datasets', 'tiny', 'train', sub))
    for i in range(4):
        gt = cv2.resize(rng.integers(0, 256, (10, 10, 3), dtype=np.uint8), (40, 40))
        lq = np.clip(gt.astype(int) + rng.integers(-20, 21, gt.shape), 0, 255).astype(np.uint8)
        cv2.imwrite(os.path.join(root, 'datasets', 'tiny', 'train', 'gt', f'{i}.png'), gt)
        cv2.imwrite(os.path.join(root, 'datasets', 'tiny', 'train', 'lq', f'{i}.png'), lq)


def write_options(root):
    with open(TINY_NAFNET, encoding='utf-8') as f:
        opt = yaml.safe_load(f)
    opt['name'] = NAME
    opt['datasets'].pop('val')
    opt.pop('val')
    opt['train']['total_iter'] = TOTAL_ITER
    opt['train']['scheduler']['T_max'] = TOTAL_ITER
    opt['logger'].update(print_freq=1, save_checkpoint_freq=1)
    path = os.path.join(root, 'crash.yml')
    with open(path, 'w', encoding='utf-8') as f:
        yaml.safe_dump(opt, f)
    return path, opt


def hidden_tmp_files(exp):
    return glob.glob(os.path.join(exp, 'models', '.*.tmp')) + glob.glob(os.path.join(exp, 'training_states', '.*.tmp'))


def state_iters(exp):
    folder = os.path.join(exp, 'training_states')
    names = os.listdir(folder) if os.path.isdir(folder) else []
    return sorted(int(n[:-6]) for n in names if re.fullmatch(r'\d+\.state', n))


def model_iters(exp):
    folder = os.path.join(exp, 'models')
    names = os.listdir(folder) if os.path.isdir(folder) else []
    return sorted(int(n[len('net_g_'):-4]) for n in names if re.fullmatch(r'net_g_\d+\.pth', n))


def check_checkpoints(exp, net_opt):
    """Every visible checkpoint loads (weights_only) and fits the network; the newest state has its weights."""
    expected = build_network(dict(net_opt)).state_dict()
    for path in glob.glob(os.path.join(exp, 'models', 'net_g_*.pth')):
        params = load_checkpoint_file(path)['params']
        assert list(params) == list(expected), path
        assert all(params[k].shape == v.shape for k, v in expected.items()), path
    iters = state_iters(exp)
    for it in iters:
        state = load_checkpoint_file(os.path.join(exp, 'training_states', f'{it}.state'))
        assert state['iter'] == it and len(state['optimizers']) == 1 and len(state['schedulers']) == 1
    if iters:
        assert os.path.isfile(os.path.join(exp, 'models', f'net_g_{iters[-1]}.pth'))
    return iters


def wait_for(predicate, pid, timeout):
    """Poll ``predicate`` every 2 ms until true (-> True) or the child is gone / time is up (-> False)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        try:
            finished, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:  # not our child: the zygote reaps it; check it is still alive
            finished = 0
            try:
                with open(f'/proc/{pid}/stat') as f:
                    if f.read().split(')')[-1].split()[0] == 'Z':
                        return False
            except FileNotFoundError:
                return False
        if finished:
            return False
        time.sleep(0.002)
    return False


def test_sigkill_at_random_moments_then_auto_resume(tmp_path):
    root = str(tmp_path)
    make_folders(root)
    opt_file, opt = write_options(root)
    exp = os.path.join(root, 'experiments', NAME)
    argv = ['-opt', opt_file, '--auto_resume']
    rng = random.Random(7)
    # Kill moments (seeded order): 'delay' = a random time after start (start-up, or training and saving);
    # the others freeze the run inside its k-th checkpoint write (random k) and kill it there: 'tmp' with the
    # complete temporary file not yet renamed, 'half' with half of it written, 'after_pth' right after a new
    # net_g_<iter>.pth was renamed into place and before its <iter>.state was written.
    # With save_checkpoint_freq 1 the writes of a run alternate net_g_<i>.pth (even k), <i>.state (odd k).
    modes = ['delay'] * 4 + ['tmp'] * 2 + ['half'] * 2 + ['after_pth'] * 2
    rng.shuffle(modes)
    zygote = Zygote()
    history, tmp_before = [], set()
    try:
        for run, mode in enumerate(modes + ['finish']):
            before = state_iters(exp)
            job = {'cwd': root, 'argv': argv, 'log': os.path.join(root, f'run{run}.log'), 'stall_at': None}
            open(job['log'], 'w').close()  # the child may be killed before it opens it
            if mode in ('tmp', 'half'):
                job.update(stall_at=rng.randint(0, 5), fraction=1.0 if mode == 'tmp' else 0.5)
            elif mode == 'after_pth':
                job.update(stall_at=2 * rng.randint(0, 2) + 1, fraction=0.0)
            pid = zygote.ask(job)['pid']
            if mode == 'delay':
                delay = rng.uniform(-0.6, 0.6)
                if delay >= 0:  # during training: some time after the first logged iteration
                    assert wait_for(lambda: 'iter:' in open(job['log'], errors='replace').read(), pid, 120), \
                        open(job['log']).read()[-3000:]
                time.sleep(abs(delay))
            elif mode != 'finish':
                assert wait_for(lambda: os.path.exists(job['log'] + '.stalled'), pid, 120), \
                    open(job['log']).read()[-3000:]
            if mode != 'finish':
                os.kill(pid, signal.SIGKILL)
            status = zygote.ask({'wait': pid})['status']
            log = open(job['log'], encoding='utf-8', errors='replace').read()
            if mode == 'finish':
                assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, log[-3000:]
            else:
                assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, log[-3000:]
            after = check_checkpoints(exp, opt['network_g'])
            assert set(before) <= set(after)  # no state is lost or replaced by a broken one
            if job['stall_at'] is not None:  # frozen in write k: k // 2 iterations completed their state
                start = before[-1] if before else 0
                done = after[-1] if after else 0
                assert done == start + job['stall_at'] // 2
                # the killed write's temporary file is left (SIGKILL runs no clean-up); resuming ignores it
                assert len(set(hidden_tmp_files(exp)) - tmp_before) == 1
                if mode == 'after_pth':
                    assert os.path.isfile(os.path.join(exp, 'models', f'net_g_{done + 1}.pth'))
            if before:
                resumed = re.findall(r'Resuming training from epoch: \d+, iter: (\d+)\.', log)
                if mode != 'delay' or resumed:  # (a kill during start-up may come before the line)
                    assert [int(i) for i in resumed] == [before[-1]], log[-3000:]
                assert not glob.glob(os.path.join(root, 'experiments', f'{NAME}_archived_*'))
            tmp_before = set(hidden_tmp_files(exp))
            history.append(after[-1] if after else 0)
    finally:
        zygote.close()

    assert history == sorted(history) and history[-1] == TOTAL_ITER
    assert len(modes) >= 10
    final = build_network(dict(opt['network_g']))
    final.load_state_dict(load_checkpoint_file(os.path.join(exp, 'models', 'net_g_latest.pth'))['params'])
    last = load_checkpoint_file(os.path.join(exp, 'training_states', f'{TOTAL_ITER}.state'))
    assert last['iter'] == TOTAL_ITER
