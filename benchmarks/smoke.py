"""Run every harness with --smoke and check that each prints its JSON (CI's check that the
harnesses work; their numbers mean nothing at this size).

    .venv/bin/python benchmarks/smoke.py [harness ...]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REQUIRED = ("name", "ratio", "goal", "smoke")


def harnesses() -> list[str]:
    return sorted(p.stem for p in HERE.glob("*.py") if not p.stem.startswith("_") and p.stem != "smoke")


def last_json_object(stdout: str) -> dict:
    """The harness's JSON: the last top-level object printed (Ray may print before it)."""
    return json.loads(stdout[stdout.rfind("\n{\n") + 1:])  # rfind -1 -> 0: the object opens stdout


def smoke(name: str, tmp: Path) -> str:
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp / f'{name}.db'}"}
    started = time.monotonic()
    proc = subprocess.run([sys.executable, str(HERE / f"{name}.py"), "--smoke"], cwd=HERE.parent, env=env,
                          capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise SystemExit(f"{name} --smoke failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    result = last_json_object(proc.stdout)
    missing = [k for k in REQUIRED if k not in result]
    if missing or result["name"] != name or result["smoke"] is not True:
        raise SystemExit(f"{name} --smoke printed {result!r}: needs {REQUIRED} with name {name!r} and smoke true")
    return f"{name}: ok in {time.monotonic() - started:.0f} s"


def main() -> None:
    names = sys.argv[1:] or harnesses()
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            print(smoke(name, Path(tmp)), flush=True)


if __name__ == "__main__":
    main()
