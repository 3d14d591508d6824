"""The lab: a Kubernetes-like cluster built from network namespaces on this machine (demos and tests)."""

from bpflb_lab.lab.core import Lab
from bpflb_lab.lab.errors import LabError, LabUnsupported

__all__ = ["Lab", "LabError", "LabUnsupported"]
