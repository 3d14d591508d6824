"""The lab: a Kubernetes-like cluster built from network namespaces on this machine (demos and tests)."""

from bpflb.lab.core import Lab
from bpflb.lab.errors import LabError, LabUnsupported

__all__ = ["Lab", "LabError", "LabUnsupported"]
