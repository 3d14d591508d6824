"""Every command the docs show is one something runs: the commands are extracted from README.md and docs/*.md
(shell blocks, and inline `bpflb ...` code), each is reduced to its verb ("bpflb lab up", "kubectl patch"),
and each verb must be in TESTED, which names the files that run it (a test, or CI's own scripts) and a text
those files must contain. A new command in a doc without a runner fails here; so does a runner that no
longer runs it; a test named as a runner is named whole. The README's "Two commands" are two, and CI runs
its test command exactly as written. The README stays short (about 250 lines at most); the rest lives in docs/."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PROGRAMS = ("bpflb", "make", "scripts/install-deps.sh", "helm", "kubectl", "docker")

# verb -> [(file relative to the repository, text it must contain)]: where the command really runs.
TESTED: dict[str, list[tuple[str, str]]] = {
    "make demo": [("Makefile", "demo: venv bpf"), ("tests/lab/test_cli.py", '"up"'),
                  ("tests/lab/test_cli.py", '"check"')],
    "make test": [(".ci/run", "make test")],
    "make chart": [("tests/chart/test_chart.py", "def test_make_chart_lints_and_packages_the_chart("),
                   ("Makefile", "scripts/chart.py --out dist")],
    "make bench-quick": [(".ci/run", "make bench-quick")],
    "scripts/install-deps.sh": [(".ci/run", "scripts/install-deps.sh")],
    "bpflb agent": [("tests/lab/test_cluster.py", '"agent", "--node-name"'),
                    ("tests/control/test_kube_source.py",
                     "def test_the_agent_programs_the_maps_from_the_api_and_survives_an_outage("),
                    ("tests/control/test_install_namespace.py",
                     "def test_the_operator_and_an_agent_keep_everything_in_their_own_namespace(")],
    "bpflb operator": [("tests/control/helpers.py", "op.run(")],
    "bpflb inspect": [("tests/bpf/test_lbmaps.py", 'main(["inspect", "--pin-root"')],
    "bpflb mount-bpffs": [("tests/unit/test_bpffs.py", '"-m", "bpflb", "mount-bpffs"')],
    "bpflb lab up": [("tests/lab/test_cli.py", '"up"')],
    "bpflb lab down": [("tests/lab/test_cli.py", '"down"')],
    "bpflb lab status": [("tests/lab/test_cli.py", '"status"')],
    "bpflb lab check": [("tests/lab/test_cli.py", '"check"')],
    "bpflb lab apply": [("tests/lab/test_cli.py", '"apply"')],
    "bpflb lab exec": [("tests/lab/test_cli.py", '"exec"')],
    "bpflb lab mode": [("tests/lab/test_dsr.py", "set_mode("), ("operator/bpflb_lab/lab/commands.py", "set_mode(")],
    "bpflb bench": [("scripts/bench-quick.sh", 'bench --quick'), (".ci/run", "make bench-quick")],
    "bpflb bench-kube": [("scripts/bench-quick.sh", "bench-kube")],
    "bpflb bench-kube latency": [("scripts/bench-quick.sh", "bench-kube latency")],
    "bpflb bench-kube fullsync": [("scripts/bench-quick.sh", "bench-kube fullsync")],
    # The image: no container engine here; the wheel its build stage makes is built and inspected.
    "docker build": [("tests/chart/test_product_wheel.py", "build_stage_copies()")],
    # The chart: rendered and validated by Helm's own library with the same values.
    "helm install": [("tests/chart/test_chart.py", "def test_every_rendered_manifest_validates("),
                     ("tests/chart/test_chart.py", "def test_the_chart_installs_into_any_namespace(")],
    # The ModuleConfig walkthrough: every kubectl command of it, read from the page and run with the real
    # kubectl against a lab with the operator; kubectl's other uses against the emulated API.
    "kubectl apply": [("tests/lab/test_kube.py", "def test_the_docs_kubectl_walkthrough_runs_against_the_lab("),
                      ("tests/control/test_kubectl.py", '"apply", "-f", "-"')],
    "kubectl get": [("tests/lab/test_kube.py", "walkthrough()"), ("tests/control/test_kubectl.py", '"get", "mc"')],
    "kubectl patch": [("tests/lab/test_kube.py", "walkthrough()"), ("tests/control/test_kubectl.py", '"patch", "mc"')],
    "kubectl wait": [("tests/lab/test_kube.py", "walkthrough()"), ("tests/control/test_kubectl.py", '"wait"')],
    "bpflb lab kubectl": [("tests/lab/test_kube.py", '"lab", "kubectl"')],
    "bpflb lab set": [("tests/lab/test_lab_objects.py", '"lab", "set"')],
    "bpflb lab delete": [("tests/lab/test_cli.py", '"delete"'), ("tests/lab/test_lab_objects.py", '"endpointslice"')],
}
VERB_WORDS = {"bpflb": 2, "make": 1, "helm": 1, "kubectl": 1, "docker": 1, "scripts/install-deps.sh": 0}


def shown_commands() -> list[tuple[str, str]]:
    """(doc, command) for every command line of a shell block and every inline `bpflb ...` span."""
    found: list[tuple[str, str]] = []
    for doc in DOCS:
        text = doc.read_text()
        for block in re.findall(r"```(?:sh|bash|console|shell)\n(.*?)```", text, re.DOTALL):
            joined = re.sub(r"\\\n\s*", " ", block)
            heredoc = None
            for line in joined.splitlines():
                if heredoc is not None:
                    heredoc = None if line.strip() == heredoc else heredoc
                    continue
                for part in line.split("&&"):
                    cmd = part.split(" #")[0].strip()
                    if cmd.startswith(PROGRAMS):
                        found.append((doc.name, cmd))
                match = re.search(r"<<'?(\w+)'?", line)
                if match:
                    heredoc = match.group(1)
        for span in re.findall(r"`((?:\.venv/bin/)?bpflb [^`]+)`", text):
            found.append((doc.name, span))
    return found


def verb(command: str) -> str:
    words = shlex.split(command.replace("\\|", "|").replace("[", " [").split(" -- ")[0])
    words[0] = words[0].removeprefix(".venv/bin/")
    program = words[0]
    rest = [w for w in words[1:] if not w.startswith(("-", "[", "<"))]
    take = VERB_WORDS[program]
    if program == "bpflb" and rest and rest[0] not in ("lab", "bench-kube"):
        take = 1
    return " ".join([program, *rest[:take]])


def test_the_readme_is_short_and_points_to_the_docs() -> None:
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    for doc in ("datapath", "operations", "lab", "benchmarks", "limits"):
        assert f"(docs/{doc}.md)" in readme and (ROOT / "docs" / f"{doc}.md").exists(), doc


def test_every_command_a_doc_shows_is_run_by_a_test_or_by_ci() -> None:
    commands = shown_commands()
    assert len(commands) > 20, commands
    untested = sorted({(doc, cmd) for doc, cmd in commands
                       if verb(cmd) not in TESTED and not verb(cmd).endswith(("lab|bench|bench-kube", "bpflb lab"))})
    assert not untested, f"commands in the docs that nothing runs (add a test, or a TESTED entry): {untested}"


def test_every_runner_still_runs_its_command() -> None:
    for name, runners in TESTED.items():
        for path, needle in runners:
            text = (ROOT / path).read_text()
            assert needle in text, f"{name}: {path} no longer contains {needle!r}"
            # A test named as a runner is named whole (not any `def test_` of the file).
            if needle.startswith("def "):
                assert re.fullmatch(r"def test_\w+\(", needle), f"{name}: {needle!r} names no test"


def two_commands() -> list[str]:
    """The commands of the README's "Two commands" block (comments dropped)."""
    section = (ROOT / "README.md").read_text().split("\n## Two commands\n", 1)[1].split("\n## ", 1)[0]
    [block] = re.findall(r"```sh\n(.*?)```", section, re.DOTALL)
    return [line.split(" #")[0].strip() for line in block.splitlines() if line.strip()]


def test_the_readmes_two_commands_are_two_and_ci_runs_the_test_one_verbatim() -> None:
    commands = two_commands()
    assert len(commands) == 2, commands
    [test] = [c for c in commands if c.endswith("make test")]
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert test in ci, f"CI does not run the README's test command {test!r} as it is written"


def test_internal_links_resolve() -> None:
    for doc in DOCS:
        for target in re.findall(r"\]\(((?:docs/)?[\w-]+\.md)(?:#[\w-]*)?\)", doc.read_text()):
            assert (doc.parent / target).exists(), (doc.name, target)
