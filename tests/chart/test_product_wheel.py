"""The product apart from the workshop, as the image builds it: the wheel built from exactly what the
Dockerfile's build stage copies (through .dockerignore) holds the bpflb package and nothing of bpflb_lab, needs
none of the lab's third-party tools, and, installed on its own, imports every module without touching the
workshop; its `bpflb lab|bench|bench-kube` say how to get the workshop instead of failing obscurely."""

from __future__ import annotations

import fnmatch
import shlex
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from tests.chart.helpers import ROOT

DOCKERFILE = ROOT / "Dockerfile"


def build_stage_copies() -> list[str]:
    """The sources of the build stage's COPY instructions (every COPY before the runtime stage)."""
    sources: list[str] = []
    stage = ""
    for line in DOCKERFILE.read_text().splitlines():
        words = shlex.split(line) if line.startswith(("FROM ", "COPY ")) else []
        if words[:1] == ["FROM"]:
            stage = words[-1]
        elif words[:1] == ["COPY"] and stage == "build" and not any(w.startswith("--from") for w in words):
            sources += words[1:-1]
    return sources


def ignored(rel: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatch(rel, p) or fnmatch.fnmatch(rel, p.removeprefix("**/")) or
               rel == p or rel.startswith(p.rstrip("/") + "/") or f"/{p.removeprefix('**/')}/" in f"/{rel}/"
               for p in patterns)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The product's wheel, built offline from the Dockerfile's build context."""
    context = tmp_path_factory.mktemp("context")
    patterns = [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines()
                if p.strip() and not p.startswith("#")]
    for source in build_stage_copies():
        src = ROOT / source
        for path in ([src] if src.is_file() else sorted(src.rglob("*"))):
            rel = str(path.relative_to(ROOT))
            if path.is_file() and not ignored(rel, patterns):
                (context / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, context / rel)
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(out), str(context)], check=True, capture_output=True, text=True)
    [built] = out.glob("bpflb-*.whl")
    return built


def test_the_image_wheel_holds_the_product_only(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    packages = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert packages == {"bpflb"}, packages
    assert "bpflb/agent.py" in names and "bpflb/control/operator.py" in names
    assert not [n for n in names if "lab" in n.split("/")[1:2] or "bench" in n or "trafficgen" in n], names
    [meta] = [n for n in names if n.endswith(".dist-info/METADATA")]
    requires = [line for line in zipfile.ZipFile(wheel).read(meta).decode().splitlines()
                if line.startswith("Requires-Dist:")]
    for tool in ("kmock", "scapy", "matplotlib"):
        assert all(tool not in r or "extra ==" in r for r in requires), (tool, requires)


def test_the_installed_product_imports_nothing_from_the_workshop(wheel: Path, tmp_path: Path) -> None:
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target",
                    str(target), str(wheel)], check=True, capture_output=True, text=True)
    # -S: no site-packages processing, so the development install's path hooks (bpflb_lab among them) are not
    # there; the dependencies come from the site-packages directory itself.
    script = """
import importlib, pkgutil, sys
import bpflb
for mod in pkgutil.walk_packages(bpflb.__path__, "bpflb."):
    if mod.name != "bpflb.__main__":
        importlib.import_module(mod.name)
assert bpflb.__file__.startswith(sys.argv[1]), bpflb.__file__
leaked = sorted(m for m in sys.modules if m.split(".")[0] in ("bpflb_lab", "kmock", "scapy", "matplotlib"))
print("LEAKED", leaked)
from bpflb.cli import main
sys.exit(main(["lab", "up"]))
"""
    path = f"{target}:{sysconfig.get_paths()['purelib']}:{sysconfig.get_paths()['platlib']}"
    done = subprocess.run([sys.executable, "-S", "-c", script, str(target)], capture_output=True, text=True,
                          env={"PYTHONPATH": path, "PATH": "/usr/bin:/bin"}, check=False)
    assert "LEAKED []" in done.stdout, (done.stdout, done.stderr)
    assert done.returncode == 2, done.stderr
    assert "bpflb lab: the lab and the benchmarks are not part of this installation" in done.stderr
    assert "pip install -e '.[lab]'" in done.stderr
