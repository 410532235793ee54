# Two commands do everything on a fresh machine (see README):
#   make demo   -- the main job
#   make test   -- the test suite (what CI runs)
# Both create or refresh the local virtual environment in $(VENV) first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.perceive-ir-installed

.PHONY: venv test demo bench clean

venv: $(STAMP)

$(STAMP): setup.py requirements.txt perceive_ir_tv_alias.pth
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip 'setuptools<81' wheel
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-build-isolation basicsr==1.4.2
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	# Editable installs do not carry the start-up hook that a regular install gets from
	# setup.py; copy it so that `import basicsr` works before the plugin is imported.
	cp perceive_ir_tv_alias.pth "$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/"
	$(PY) -m pip check
	touch $@

test: venv
	$(PY) -m pytest -q -n 2 --durations=15 tests

demo: venv
	$(PY) -m perceive_ir_plugin.cli demo

bench: venv
	for f in bench/[!_]*.py; do $(PY) $$f || exit 1; done

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
