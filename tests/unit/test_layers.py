"""The contracts of .importlinter hold, and a violation of each kind fails: lint-imports (what `make lint` runs)
passes on the tree, and reports BROKEN on copies of it where the model imports the datapath and the product
imports the lab (forbidden imports), a lower layer imports a higher one (layers), and two sibling modules
import each other (no cycles), each time the contract violated and only that one."""

from __future__ import annotations

import configparser
import re
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


def contract_names() -> dict[str, str]:
    """Contract id (the section's suffix) -> its name, from .importlinter."""
    config = configparser.ConfigParser()
    config.read(ROOT / ".importlinter")
    prefix = "importlinter:contract:"
    return {section.removeprefix(prefix): config[section]["name"] for section in config.sections()
            if section.startswith(prefix)}


def verdicts(done: subprocess.CompletedProcess[str]) -> dict[str, str]:
    """Contract id -> KEPT | BROKEN, as lint-imports' summary says (its lines wrap long names)."""
    text = " ".join(done.stdout.split())
    out = {}
    for key, name in contract_names().items():
        found = re.findall(rf"{re.escape(name)} (KEPT|BROKEN)", text)
        assert found, f"lint-imports said nothing of {name!r}: {done.stdout}{done.stderr}"
        out[key] = found[0]
    return out


def scratch_tree(tmp_path: Path, *edits: tuple[str, str]) -> Path:
    """A copy of operator/ with each (module file, import line) appended."""
    copy = tmp_path / "operator"
    shutil.copytree(ROOT / "operator", copy, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for module, line in edits:
        path = copy / module
        path.write_text(path.read_text() + f"\n{line}  # noqa: E402,F401\n")
    return copy


def test_the_tree_keeps_every_contract() -> None:
    done = lint(ROOT / "operator")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 broken" in done.stdout
    assert set(verdicts(done).values()) == {"KEPT"}


def test_a_wrong_import_breaks_the_contracts(tmp_path: Path) -> None:
    done = lint(scratch_tree(tmp_path, ("bpflb/model/types.py", "from bpflb.datapath import lbmaps"),
                             ("bpflb/agent.py", "import bpflb_lab.lab")))
    assert done.returncode != 0, done.stdout
    assert "The model and the sources import neither the datapath nor the control plane BROKEN" in \
        " ".join(done.stdout.split())
    assert "The product never imports the workshop" in done.stdout and "bpflb.agent -> bpflb_lab.lab" in done.stdout


def test_a_lower_layer_importing_a_higher_one_breaks_the_layers(tmp_path: Path) -> None:
    # healthcheck sits with the datapath, below inspect (which imports nothing of healthcheck: no cycle).
    done = lint(scratch_tree(tmp_path, ("bpflb/healthcheck.py", "import bpflb.inspect")))
    assert done.returncode != 0, done.stdout
    assert verdicts(done) == {**dict.fromkeys(contract_names(), "KEPT"), "product-layers": "BROKEN"}
    assert "bpflb.healthcheck -> bpflb.inspect" in done.stdout


def test_two_sibling_modules_importing_each_other_break_the_no_cycles_contract(tmp_path: Path) -> None:
    # Two modules of one layer (bpflb.control): no layer is crossed, only the cycle is wrong.
    done = lint(scratch_tree(tmp_path, ("bpflb/control/events.py", "import bpflb.control.status"),
                             ("bpflb/control/status.py", "import bpflb.control.events")))
    assert done.returncode != 0, done.stdout
    assert verdicts(done) == {**dict.fromkeys(contract_names(), "KEPT"), "no-cycles": "BROKEN"}
    said = " ".join(done.stdout.split())
    assert "allowed in bpflb.control." in said and (".status -> .events" in said or ".events -> .status" in said)


def test_the_agent_and_the_operator_do_not_load_the_workshop() -> None:
    """`bpflb agent|operator` leave the lab and benchmark package (bpflb_lab) unimported even where it is
    installed (a checkout; the image has none): memory on every node; `bpflb lab` loads it."""
    probe = ("import sys, bpflb.cli as c\n"
             "c.cmd_agent = c.cmd_operator = lambda args: print('bpflb_lab' in sys.modules) or 0\n"
             "c.main(sys.argv[1:])\n")
    for argv, loaded in ((["agent", "--node-name", "n1", "--kube"], "False"), (["operator"], "False")):
        run = subprocess.run([sys.executable, "-c", probe, *argv], capture_output=True, text=True, check=True)
        assert run.stdout.strip() == loaded, (argv, run.stdout, run.stderr)
    lab = subprocess.run([sys.executable, "-m", "bpflb", "lab", "-h"], capture_output=True, text=True, check=False)
    assert lab.returncode == 0 and "usage: bpflb lab" in lab.stdout, lab.stderr
