"""Import hygiene: loss, data and model modules never pull in vLLM or DeepSpeed (heavy, slow, and they change
global state such as the accelerator); imports flow one way: common -> data -> model -> reward, rollout -> align."""

import ast
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
LIGHT = ["data.chatml", "data.datasets", "data.tokenizer", "data.feedback", "model.qwen", "model.logprobs",
         "model.checkpoint", "model.heads", "reward.losses", "common.config", "rollout.base"]
LEVEL = {"common": 0, "data": 1, "model": 2, "reward": 3, "rollout": 3, "align": 4}


def run_ok(code: str) -> None:
    """Run `code` in a fresh interpreter from the repository root; it must print 'ok' last."""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]


def test_light_modules_do_not_import_vllm_or_deepspeed():
    present = [m for m in LIGHT if (ROOT / (m.replace(".", "/") + ".py")).exists()]
    code = ("import sys, importlib\n"
            f"for m in {present!r}:\n"
            "    importlib.import_module(m)\n"
            "    heavy = sorted(k for k in ('vllm', 'deepspeed') if k in sys.modules)\n"
            "    assert not heavy, (m, heavy)\n"
            "print('ok')")
    run_ok(code)


def test_imports_flow_one_way():
    """A module of package P may import only packages at a lower level, or its own."""
    bad = []
    for pkg, level in LEVEL.items():
        for f in sorted((ROOT / pkg).glob("*.py")):
            for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                    [node.module] if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 else []
                for name in names:
                    top = name.split(".")[0]
                    if top in LEVEL and top != pkg and LEVEL[top] >= level:
                        bad.append(f"{f.relative_to(ROOT)} imports {name}")
    assert not bad, bad


def entry_points() -> set[str]:
    """Modules a user runs (they have a `__main__` block), as dotted names."""
    found = set()
    for pkg in LEVEL:
        for f in (ROOT / pkg).glob("*.py"):
            if 'if __name__ == "__main__":' in f.read_text(encoding="utf-8"):
                found.add(f"{pkg}.{f.stem}")
    return found


def test_no_entry_point_imports_another():
    """Shared pieces live in modules that are not entry points (align/models.py, align/experience.py, ...), so each
    entry point reads top to bottom as its recipe and can change without breaking another."""
    mains = entry_points()
    assert {"align.sft", "align.ppo", "align.dpo", "align.kto", "align.evaluate", "reward.train"} <= mains
    bad = []
    for m in sorted(mains):
        tree = ast.parse((ROOT / (m.replace(".", "/") + ".py")).read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 else []
            bad += [f"{m} imports {n}" for n in names if n in mains and n != m]
    assert not bad, bad


def test_start_up_skips_what_a_run_without_deepspeed_does_not_use():
    """Every trainer process and rank loads a built-in tokenizer and, to save, unwraps its model. Neither pulls in
    transformers' model registry (generation utilities, torch.distributed.tensor, sympy: ~3 s of CPU, what
    AutoTokenizer costs) nor, without DeepSpeed, deepspeed (~3 s, what accelerate's unwrap_model costs)."""
    code = ("import sys, torch\n"
            "from accelerate import Accelerator\n"
            "from common.loop import unwrap_model\n"
            "from data.tokenizer import small_tokenizer\n"
            "tok = small_tokenizer()\n"
            "acc = Accelerator(cpu=True)\n"
            "m = torch.nn.Linear(2, 2)\n"
            "assert unwrap_model(acc, acc.prepare(m)) is m\n"
            "assert tok.eos_token == '<|im_end|>'\n"
            "heavy = [k for k in ('deepspeed', 'transformers.models.auto.auto_factory') if k in sys.modules]\n"
            "assert not heavy, heavy\n"
            "print('ok')")
    run_ok(code)
