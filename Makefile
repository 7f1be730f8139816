# Two entry points: `make demo` (set up and run the main job) and `make test` (set up from scratch and run the tests).
PYTHON ?= python3
VENV ?= .venv
TEST_VENV ?= .venv-test
# torch first, pinned: an unpinned resolve can pull several GB of CUDA wheels.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1

.PHONY: demo test venv clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q $(TORCH_SPEC)
	$(VENV)/bin/pip install -q -e .
	touch $@

venv: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/uflow demo --out demo_output

# Always a fresh environment built from this repository's files, so a missing install step fails here.
test:
	rm -rf $(TEST_VENV)
	$(PYTHON) -m venv $(TEST_VENV)
	$(TEST_VENV)/bin/pip install -q --upgrade pip
	$(TEST_VENV)/bin/pip install -q $(TORCH_SPEC)
	$(TEST_VENV)/bin/pip install -q ".[test]"
	HF_HUB_OFFLINE=1 $(TEST_VENV)/bin/python -m pytest -q

clean:
	rm -rf $(VENV) $(TEST_VENV) demo_output
