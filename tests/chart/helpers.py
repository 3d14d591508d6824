"""Helpers of the chart tests (the one home of them; fixtures are in conftest.py): the chart rendered by Helm's own library (helm-python-sdk, Helm v4's Go SDK),
the rendered documents, and validation against Kubernetes' own schemas (kubernetes-validate) per version."""

from __future__ import annotations

import copy
from functools import cache
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "bpflb"
CRD = ROOT / "crds" / "moduleconfig.yaml"
NAMESPACE = "kube-system"
RELEASE = "bpflb"
# The chart's minimum (kubeVersion >=1.30: ValidatingAdmissionPolicy v1, node-bound token claims) and the
# upstream-supported minors the schemas go to.
KUBE_VERSIONS = ("1.30", "1.35", kubernetes_validate.latest_version())

Doc = dict[str, Any]


@cache
def chart() -> helm.Chart:
    helm.disable_logging()
    return helm.Chart.load(CHART)


def render(values: dict[str, Any] | None = None, namespace: str = NAMESPACE) -> dict[str, str]:
    """template path -> rendered text, as `helm template -n NAMESPACE bpflb charts/bpflb` gives."""
    return chart().render(copy.deepcopy(values or {}), name=RELEASE, namespace=namespace, is_install=True)


def documents(values: dict[str, Any] | None = None, namespace: str = NAMESPACE) -> list[Doc]:
    """Every Kubernetes object the chart renders (templates only: NOTES.txt left out; the CRD is in crds/)."""
    out: list[Doc] = []
    for path, text in sorted(render(values, namespace).items()):
        if path.endswith("NOTES.txt"):
            continue
        out.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return out


def find(docs: list[Doc], kind: str, name: str | None = None) -> Doc:
    matches = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(matches) == 1, f"expected one {kind} {name or ''}, found {[d['metadata']['name'] for d in matches]}"
    return matches[0]


def validation_errors(doc: Doc, version: str) -> list[str]:
    """Kubernetes' schema (strict: unknown fields are errors) of this kind at this version; [] when valid."""
    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        where = "/".join(str(p) for p in exc.path)
        return [f"{doc['kind']} {doc['metadata'].get('name')}: {where}: {exc.message}"]
    return []


def crd_schema() -> Doc:
    crd = yaml.safe_load(CRD.read_text())
    [version] = crd["spec"]["versions"]
    schema: Doc = version["schema"]["openAPIV3Schema"]
    return schema
