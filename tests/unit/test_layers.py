"""The layers of .importlinter hold, and a violation fails: lint-imports (what `make lint` runs) passes on the
tree, and fails on a copy of it where the model imports the datapath and the product imports the lab."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def lint(source_root: Path) -> subprocess.CompletedProcess[str]:
    """lint-imports over the packages under source_root (only those on the path), with the repository's
    contracts."""
    return subprocess.run([str(LINT_IMPORTS), "--config", str(ROOT / ".importlinter"), "--no-cache"],
                          cwd=source_root, capture_output=True, text=True, check=False,
                          env={"PYTHONPATH": str(source_root), "PATH": "/usr/bin:/bin"})


def test_the_tree_keeps_every_contract() -> None:
    done = lint(ROOT / "operator")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 broken" in done.stdout


def test_a_wrong_import_breaks_the_contracts(tmp_path: Path) -> None:
    copy = tmp_path / "operator"
    shutil.copytree(ROOT / "operator", copy, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    types = copy / "bpflb" / "model" / "types.py"
    types.write_text(types.read_text() + "\nfrom bpflb.datapath import lbmaps  # noqa: E402,F401\n")
    agent = copy / "bpflb" / "agent.py"
    agent.write_text(agent.read_text() + "\nimport bpflb_lab.lab  # noqa: E402,F401\n")
    done = lint(copy)
    assert done.returncode != 0, done.stdout
    assert "The model and the sources import neither the datapath nor the control plane BROKEN" in \
        " ".join(done.stdout.split())
    assert "The product never imports the workshop" in done.stdout and "bpflb.agent -> bpflb_lab.lab" in done.stdout
