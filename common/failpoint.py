"""Named crash points for the reliability tests: `QWEN_ALIGN_FAILPOINT=name[@step],...` makes the process kill
itself with SIGKILL (no cleanup, like a power cut or `kill -9`) when it reaches that point.

Points (see docs/DESIGN.md "Runs and checkpoints"): `atomic_dir:<folder name>` (a folder is fully written and
fsynced but not yet renamed into place; e.g. `atomic_dir:step-00000004`, `atomic_dir:final`),
`checkpoint.renamed@N` (checkpoint N is in place, `latest` not yet updated), `prune@N` (old checkpoint N was
renamed out of the live names, not yet deleted), `metrics.torn@N` (half of step N's metrics row is written),
`final.written` (final/ is in place, the run is not yet marked finished), `replace.partial` (an old run is half
moved aside). Unset (the normal case) each call costs one environment lookup.
"""

from __future__ import annotations

import os
import signal

ENV = "QWEN_ALIGN_FAILPOINT"


def armed(name: str, step: int | None = None) -> bool:
    spec = os.environ.get(ENV)
    if not spec:
        return False
    for item in spec.split(","):
        want, _, at = item.strip().partition("@")
        if want == name and (not at or (step is not None and int(at) == step)):
            return True
    return False


def failpoint(name: str, step: int | None = None) -> None:
    """SIGKILL this process if `name` (at `step`) is armed."""
    if armed(name, step):
        os.kill(os.getpid(), signal.SIGKILL)
