"""Shared by the harnesses: run.py invocations and the JSON each harness prints."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# The pipeline's supervised-only warm-up off: the harnesses time and size MKD's full step.
FULL_STEP = "method.warmup_iters=0"


def sets(overrides: list[str]) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


def train(overrides: list[str], env: dict, *args: str) -> dict:
    """`run.py train` in a subprocess; returns its --summary."""
    with tempfile.TemporaryDirectory() as tmp:
        summary = Path(tmp) / "summary.json"
        command = [sys.executable, "run.py", "train", *sets(overrides), "--storage", str(Path(tmp) / "runs"),
                   "--summary", str(summary), *args]
        proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env={
            **os.environ, **env, "MLFLOW_TRACKING_URI": f"sqlite:///{Path(tmp) / 'mlflow.db'}"})
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed:\n{proc.stderr[-3000:]}")
        return json.loads(summary.read_text())


def harness_parser(doc: str, repeats: int = 3) -> argparse.ArgumentParser:
    """The options every harness shares; each adds its own."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--smoke", action="store_true", help="a short run, to check the harness works (not its numbers)")
    return parser


def median(values: list[float]) -> float:
    return statistics.median(values)


def emit(result: dict) -> None:
    print(json.dumps(result, indent=2, default=float))
