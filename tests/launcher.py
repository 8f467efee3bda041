"""`accelerate launch` for the tests that start trainers on several ranks, in one place.

Every command gets a rendezvous port of its own: `make test-slow` runs two tests at a time (pytest-xdist), and other
jobs on the machine may hold accelerate's default 29500, which a second launch would wait on or fail to bind.
DeepSpeed launches rendezvous even with one rank. The config is a copy of a shipped configs/accelerate/*.yaml with
the number of processes the test asks for (the shipped ZeRO configs say 8), so the tests run what users run.
"""

from __future__ import annotations

import re
import socket
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A TCP port nothing listens on now (the kernel's pick for port 0)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accelerate_launch(config: str, tmp: Path, num_processes: int = 2) -> list[str]:
    """[python -m accelerate.commands.launch --config_file <tmp>/<config>-<n>.yaml --main_process_port <free>]:
    configs/accelerate/<config>.yaml with `num_processes: n`. Append the script and its arguments; build a new
    command for every launch (each gets a fresh port)."""
    text = (REPO / "configs" / "accelerate" / f"{config}.yaml").read_text()
    text, found = re.subn(r"(?m)^num_processes: \d+$", f"num_processes: {num_processes}", text)
    assert found == 1, f"configs/accelerate/{config}.yaml: no `num_processes:` line"
    path = Path(tmp) / f"{config}-{num_processes}.yaml"
    path.write_text(text)
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(path), "--main_process_port",
            str(free_port())]
