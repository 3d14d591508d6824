"""The Dockerfile, structurally (no container engine runs on this project's machines, so nothing here builds
it): its build stage runs the same make target the tests build with and installs the package; its runtime
stage copies exactly the objects the agent really loads (as the product's code names them), the header it reads
and the product's virtualenv, points the agent at them, carries no compiler, and starts `bpflb`."""

from __future__ import annotations

import ast
import json
import re
import shlex
from dataclasses import dataclass, field

from bpflb.datapath.loader import LB_OBJECT, SOCK_OBJECT, XDP_OBJECT
from bpflb.model.maglev import NATIVE_LIB
from tests.chart.helpers import ROOT

DOCKERFILE = ROOT / "Dockerfile"
BUILD = ROOT / "bpf_objects" / "build"
PRODUCT = ROOT / "operator" / "bpflb"


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)    # (INSTRUCTION, arguments)

    def args(self, instruction: str) -> list[str]:
        return [a for i, a in self.instructions if i == instruction]


def parse(text: str) -> tuple[dict[str, str], list[Stage]]:
    """Dockerfile syntax as far as this file uses it: comments, parser directives, line continuations, ARG
    before the first FROM, `FROM image AS name`."""
    logical: list[str] = []
    current = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue                                 # a comment inside a continued instruction
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        logical.append(current + line)
        current = ""
    assert not current, "the Dockerfile ends inside a continued line"
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in logical:
        instruction, _, rest = line.partition(" ")
        instruction = instruction.upper()
        if instruction == "FROM":
            parts = rest.split()
            base = re.sub(r"\$\{(\w+)\}", lambda m: global_args[m.group(1)], parts[0])
            name = parts[2] if len(parts) == 3 and parts[1].upper() == "AS" else str(len(stages))
            stages.append(Stage(name, base))
        elif not stages:
            assert instruction == "ARG", f"{instruction} before the first FROM"
            key, _, value = rest.partition("=")
            global_args[key] = value
        else:
            stages[-1].instructions.append((instruction, rest.strip()))
    return global_args, stages


def stages() -> dict[str, Stage]:
    return {s.name: s for s in parse(DOCKERFILE.read_text())[1]}


def make_targets_the_tests_build() -> set[str]:
    """The prerequisites of `make test` that build the product's artefacts (the Makefile's own words): not the
    upgrade tests' second build of the objects (bpf-layout-test), which no image carries."""
    makefile = (ROOT / "Makefile").read_text()
    [prereqs] = re.findall(r"^test:\s*(.*)$", makefile, re.MULTILINE)
    return set(prereqs.split()) - {"venv", "lint", "bpf-layout-test"}


def test_two_stages_on_the_same_debian() -> None:
    build, runtime = stages()["build"], stages()["runtime"]
    assert build.base == runtime.base, "the virtualenv is copied across: both stages need the same python3"
    assert re.fullmatch(r"debian:\w+-slim", runtime.base)
    assert list(stages()) == ["build", "runtime"]


def test_the_build_stage_runs_the_make_targets_the_tests_build() -> None:
    build = stages()["build"]
    runs = [shlex.split(r) for r in build.args("RUN")]
    made = {t for cmd in runs if cmd[:1] == ["make"] for t in cmd[1:]}
    targets = make_targets_the_tests_build()
    assert targets == {"bpf"} and made == targets, (made, targets)
    packages = " ".join(build.args("RUN"))
    for needed in ("clang", "llvm", "libbpf-dev", "linux-libc-dev", "make", "gcc", "python3-venv"):
        assert re.search(rf"\b{re.escape(needed)}\b", packages), needed
    copied = " ".join(build.args("COPY"))
    for source in ("Makefile", "bpf_objects/", "native/", "operator/", "pyproject.toml"):
        assert source in copied, source
    assert any("pip install" in r and r.rstrip().endswith(".") for r in build.args("RUN"))


def built_files_the_product_names() -> set[str]:
    """Every file of bpf_objects/build the product's code names (a string constant such as loader.py's
    SOCK_OBJECT or maglev.py's NATIVE_LIB): what the agent loads at run time, read from the code rather than
    listed here, so an object the agent gains is an object the image must carry."""
    built = {p.name for p in BUILD.iterdir() if p.is_file()}
    named: set[str] = set()
    for source in PRODUCT.rglob("*.py"):
        for node in ast.walk(ast.parse(source.read_text(), str(source))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in built:
                named.add(node.value)
    return named


def test_the_product_names_the_objects_the_agent_loads() -> None:
    # The scan above finds what the loaders and the Maglev library load (guards the scan itself).
    assert {LB_OBJECT, XDP_OBJECT, SOCK_OBJECT, NATIVE_LIB} <= built_files_the_product_names()


def test_the_runtime_stage_copies_exactly_what_runs_and_points_the_agent_at_it() -> None:
    runtime = stages()["runtime"]
    copies = [shlex.split(c) for c in runtime.args("COPY")]
    from_build = [c[1:] for c in copies if c[0] == "--from=build"]
    assert len(from_build) == len(copies), "the runtime stage takes everything from the build stage"
    sources = {src: cmd[-1] for cmd in from_build for src in cmd[:-1]}
    env = dict(re.findall(r"(\w+)=(\S+)", " ".join(runtime.args("ENV"))))
    expected = {f"/src/bpf_objects/build/{name}": env["BPFLB_BPF_DIR"] + "/"
                for name in built_files_the_product_names()}
    expected["/src/bpf_objects/include/lb_structs.h"] = env["BPFLB_BPF_INCLUDE"] + "/"
    expected["/opt/bpflb"] = "/opt/bpflb"            # the virtualenv holding the product's wheel alone
    # Exactly these: a missing object cannot attach in the image; anything more (test objects, the lab's
    # tools, a source tree) does not belong on a node.
    assert sources == expected, {"missing": expected.keys() - sources.keys(),
                                 "unexpected": sources.keys() - expected.keys()}
    assert env["PATH"].startswith("/opt/bpflb/bin:")


def test_the_virtualenv_is_built_from_the_product_package_alone() -> None:
    build = stages()["build"]
    copied = {src.rstrip("/") for c in build.args("COPY") for src in shlex.split(c)[:-1]}
    assert copied == {"Makefile", "pyproject.toml", "bpf_objects", "native", "operator/bpflb"}, copied


def test_the_runtime_stage_has_no_compiler_and_the_libraries_that_run() -> None:
    installed = " ".join(stages()["runtime"].args("RUN"))
    for needed in ("python3", "libbpf1", "iproute2"):
        assert re.search(rf"(?<![\w-]){re.escape(needed)}(?![\w-])", installed), needed
    for unwanted in ("clang", "llvm", "gcc", "make", "-dev"):
        assert unwanted not in installed, unwanted


def test_the_entry_point_and_user() -> None:
    runtime = stages()["runtime"]
    assert json.loads(runtime.args("ENTRYPOINT")[-1]) == ["bpflb"]
    assert runtime.args("USER")[-1] != "0" and not runtime.args("USER")[-1].startswith("root")
    # The agents run as root with three capabilities: the operator's DaemonSet says so explicitly.
    from bpflb.control.manifests import agent_daemonset

    [container] = agent_daemonset()["spec"]["template"]["spec"]["containers"]
    assert container["securityContext"]["runAsUser"] == 0 and container["command"][0] == "bpflb"


def test_the_build_context_keeps_what_the_build_copies() -> None:
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    copied = {src.rstrip("/") for c in stages()["build"].args("COPY") for src in shlex.split(c)[:-1]}
    assert not copied & ignored, copied & ignored
    assert {".venv", "bpf_objects/build"} <= ignored
