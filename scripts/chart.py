#!/usr/bin/env python3
"""`make chart`: lint the Helm chart with Helm's own library (helm-python-sdk, no helm binary) and package it
into a .tgz for a chart repository or an OCI registry. The archive carries crds/moduleconfig.yaml itself
(Helm resolves the chart's link to the repository's crds/), so it installs anywhere."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import helm_python as helm

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "charts" / "bpflb"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=str(ROOT / "dist"), help="where the archive goes (default: dist/)")
    args = parser.parse_args()
    helm.disable_logging()
    report = helm.lint(CHART, {}, strict=True, namespace="kube-system")
    for message in report["messages"]:
        level = {1: "info", 2: "WARNING", 3: "ERROR"}.get(message["severity"], "?")
        print(f"lint {level}: {message['path']}: {message['error'].strip()}")
    if report["errors"] or any(m["severity"] >= 2 for m in report["messages"]):
        print("chart: lint failed, nothing packaged", file=sys.stderr)
        return 1
    Path(args.out).mkdir(parents=True, exist_ok=True)
    archive = helm.package(CHART, destination=args.out)
    print(f"chart: {archive}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
