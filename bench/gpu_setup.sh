#!/usr/bin/env bash
# Source this on the GPU machine (no network): installs the few packages its image
# lacks from wheels carried in .whl/ (basicsr, lmdb, open_clip_torch, ftfy, wcwidth,
# addict) into /tmp/site and puts the checkout on PYTHONPATH.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || return 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
# The .pth start-up hook is not installed here, so import the alias explicitly first.
python3 -c "import perceive_ir_tv_alias; perceive_ir_tv_alias.install(); import basicsr, perceive_ir_plugin, torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else '')"
