"""Running one benchmark's measurement on another checkout's code, for side-by-side tables."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any


def run_in_checkout(script: str, checkout: Path, args: list[str], timeout_s: float = 300) -> dict[str, Any]:
    """Run ``script`` with ``args`` in a child process importing ``checkout``'s pipeline_runner;
    its last line of output is the JSON result."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(checkout), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run(
        [sys.executable, str(Path(script).resolve()), *args],
        cwd=checkout, env=env, capture_output=True, text=True, timeout=timeout_s, check=True,
    )  # fmt: skip
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result
