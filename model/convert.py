"""Convert checkpoints both ways between plain Hugging Face Qwen2 / Qwen3 folders and the custom model's folders.

    python -m model.convert SRC DST --to custom --set use_logn_attn=true --set use_dynamic_ntk=true --set rope_train_len=8192
    python -m model.convert SRC DST --to hf [--dtype bfloat16] [--check]

`--to custom` loads any Qwen2ForCausalLM or Qwen3ForCausalLM folder (validated: keys and config) and writes it with
the given sec. 2.5 context-extension settings. `--to hf` writes a plain Qwen2 (Qwen3) folder that transformers and
vLLM reproduce exactly; it refuses a config with extensions on, since those models would compute something else.
`--check` reloads DST with transformers and compares logits with the custom model on a random batch.
"""

from __future__ import annotations

import argparse
import sys

import torch

from common.config import ArgumentParser, ConfigError, user_errors
from common.preflight import check_model_folder, check_output_dir
from model.checkpoint import load_causal_lm, read_config, save_causal_lm

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
def _flag(s: str) -> bool:
    return s.lower() in ("1", "true", "yes")


def _windows(s: str) -> list:
    """'512,1024,none' -> [512, 1024, None]: one window per layer, 'none' = full attention."""
    return [None if x.strip().lower() == "none" else int(x) for x in s.split(",")]


EXTENSIONS = {"ntk_factor": float, "use_dynamic_ntk": _flag, "use_logn_attn": _flag, "rope_train_len": int,
              "layer_windows": _windows, "extend_context_in_training": _flag}


def parse_sets(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in EXTENSIONS:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE with KEY one of {sorted(EXTENSIONS)}")
        try:
            out[key] = EXTENSIONS[key](value)
        except ValueError:
            raise ConfigError(f"--set {item!r}: {value!r} is not a valid {key}") from None
    return out


def check_against_transformers(model, path, tol: float) -> float:
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (hf(ids).logits - model.float()(ids)).abs().max().item()
    if diff > tol:
        raise SystemExit(f"check failed: max |logits diff| = {diff:.3g} > {tol}")
    return diff


def main(argv=None):
    ap = ArgumentParser(prog="python -m model.convert", description=__doc__,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src")
    ap.add_argument("dst")
    ap.add_argument("--to", choices=["hf", "custom"], required=True)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="cast weights (default: keep float32)")
    ap.add_argument("--set", action="append", default=[], help="context-extension field for --to custom")
    ap.add_argument("--check", action="store_true", help="compare logits with transformers after --to hf")
    args = ap.parse_args(argv)
    with user_errors():  # a usage or folder mistake: one paragraph, exit status 2
        sets = parse_sets(args.set)
        if args.to == "hf" and sets:
            raise ConfigError("--set applies to --to custom only")
        check_model_folder(args.src, "SRC")
        check_output_dir(args.dst, "DST")
        try:
            read_config(args.src)
        except ValueError as e:  # an architecture the custom model cannot reproduce
            raise ConfigError(str(e)) from None
        model = load_causal_lm(args.src, **sets)
        if args.to == "hf" and model.config.extends_context:
            raise ConfigError(f"{args.src}: context extension is on (ntk_factor/use_dynamic_ntk/use_logn_attn/"
                              "layer_windows); transformers and vLLM cannot reproduce it. Convert with those off.")
    if args.dtype:
        model = model.to(DTYPES[args.dtype])
    save_causal_lm(model, args.dst)
    print(f"wrote {args.dst} ({sum(p.numel() for p in model.parameters()):,} parameters)")
    if args.check:
        diff = check_against_transformers(load_causal_lm(args.dst), args.dst, tol=1e-4)
        print(f"transformers reproduces it: max |logits diff| = {diff:.2e}")


if __name__ == "__main__":
    sys.exit(main())
