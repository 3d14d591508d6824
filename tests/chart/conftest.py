"""Fixtures of the chart tests: the Kubernetes versions every rendered manifest is validated against."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.chart.helpers import KUBE_VERSIONS


@pytest.fixture(params=KUBE_VERSIONS, ids=lambda v: f"k8s-{v}")
def kube_version(request: pytest.FixtureRequest) -> Iterator[str]:
    yield str(request.param)
