# Two commands do all set-up on a fresh machine:  `make demo`  and  `make test`.
# Each creates .venv and installs the project into it when missing (or when pyproject.toml changed).

PYTHON ?= python3
# OpenMP threads sleep instead of spinning while they wait: with data-loader workers or a second
# process on a small CPU, spinning threads slowed training about 20x here (README, "Speed").
export OMP_WAIT_POLICY ?= PASSIVE
VENV ?= .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed

.PHONY: demo test lint install clean-venv

install: $(INSTALLED)

$(INSTALLED): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# The export extra (onnx, onnxruntime) too, so the tests cover the ONNX export.
	$(PY) -m pip install -e '.[dev,export]'
	# albumentations pulls opencv-python-headless, which shares the cv2 folder with the contrib
	# build that holds selective search; whichever is written last wins. Remove the plain build and
	# rewrite the contrib one so cv2.ximgproc exists.
	$(PY) -m pip uninstall -y opencv-python-headless opencv-python
	$(PY) -m pip install --force-reinstall --no-deps \
		"opencv-contrib-python-headless==$$($(PY) -c 'import importlib.metadata as m; print(m.version("opencv-contrib-python-headless"))')"
	$(PY) -c "import cv2; cv2.ximgproc.segmentation.createSelectiveSearchSegmentation()"
	touch $(INSTALLED)

demo: $(INSTALLED)
	$(PY) tools/demo.py

lint: $(INSTALLED)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

test: lint
	$(PY) -m pytest

clean-venv:
	rm -rf $(VENV)
