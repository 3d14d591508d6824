"""The admission webhook: real HTTPS AdmissionReview requests to kopf's webhook server (self-signed
certificate, verified with the CA bundle it dumps), one per kind of bad input, and the good ones."""

from __future__ import annotations

import http.client
import json
import ssl
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from bpflb.control.operator import WEBHOOK_ID
from tests.control.helpers import RunningOperator, free_port, wait_for


@pytest.fixture
def webhook(start_operator: Callable[..., RunningOperator], tmp_path: Path) -> Iterator[Callable[..., Any]]:
    port = free_port()
    cadump = tmp_path / "ca.pem"
    start_operator(webhook_listen=f"127.0.0.1:{port}", webhook_cadump=str(cadump))
    # The whole bundle: kopf writes the file in place, so it exists a moment before it holds the certificate.
    wait_for("the webhook's CA bundle", lambda: cadump.exists() and b"-----END CERTIFICATE-----" in cadump.read_bytes())
    context = ssl.create_default_context(cafile=str(cadump))      # verified, not insecure

    def review(spec: Any, name: str = "cni-cilium", operation: str = "CREATE") -> dict[str, Any]:
        obj = {"apiVersion": "deckhouse.io/v1alpha1", "kind": "ModuleConfig", "metadata": {"name": name},
               "spec": spec}
        body: dict[str, Any] = {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {
            "uid": str(uuid.uuid4()), "kind": {"group": "deckhouse.io", "version": "v1alpha1", "kind": "ModuleConfig"},
            "resource": {"group": "deckhouse.io", "version": "v1alpha1", "resource": "moduleconfigs"},
            "requestKind": {"group": "deckhouse.io", "version": "v1alpha1", "kind": "ModuleConfig"},
            "requestResource": {"group": "deckhouse.io", "version": "v1alpha1", "resource": "moduleconfigs"},
            "name": name, "operation": operation, "userInfo": {"username": "admin"},
            "object": obj, "oldObject": None, "dryRun": False, "options": {}}}
        conn = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=10)
        try:
            conn.request("POST", f"/{WEBHOOK_ID}", json.dumps(body), {"Content-Type": "application/json"})
            resp = conn.getresponse()
            assert resp.status == 200, resp.read()
            answer: dict[str, Any] = json.loads(resp.read())["response"]
        finally:
            conn.close()
        assert answer["uid"] == body["request"]["uid"]
        return answer

    wait_for("the webhook server", lambda: _answers(review))
    yield review


def _answers(review: Callable[..., Any]) -> bool:
    try:
        review({"enabled": True})
    except OSError:
        return False
    return True


def denied(answer: dict[str, Any]) -> str:
    assert answer["allowed"] is False, answer
    assert answer["status"]["code"] == 422
    return str(answer["status"]["message"])


GOOD = [
    {"enabled": True, "version": 1, "settings": {"bpfLBMode": "SNAT"}},
    {"enabled": True, "version": 1, "settings": {"bpfLBMode": "DSR", "tunnelMode": "Disabled"}},
    {"version": 1, "settings": {"bpfLBMode": "Hybrid", "lbAlgorithm": "Maglev", "maglevTableSize": 65521,
                                "svcSourceRangeCheck": False, "debugLogging": False}},
    {"enabled": False},
    {"enabled": True, "version": 1, "settings": {}},
    {"version": 1, "settings": {"bpfLBMode": "SNAT", "svcSourceRangeCheck": True}},
]


@pytest.mark.parametrize("spec", GOOD, ids=["snat", "dsr", "hybrid-maglev", "disabled", "defaults",
                                            "source-range-check"])
def test_good_configurations_are_allowed(webhook: Callable[..., Any], spec: dict[str, Any]) -> None:
    answer = webhook(spec)
    assert answer["allowed"] is True, answer
    assert not answer.get("warnings")


BAD = [
    ("wrong-type-source-range-check", {"version": 1, "settings": {"svcSourceRangeCheck": "true"}},
     'spec.settings.svcSourceRangeCheck: must be true or false; got "true" (a string)'),
    ("maintenance-unknown", {"version": 1, "maintenance": "Sleep"},
     'spec.maintenance: must be NoResourceReconciliation (or unset); got "Sleep"'),
    ("wrong-enum", {"version": 1, "settings": {"bpfLBMode": "dsr"}},
     'spec.settings.bpfLBMode: must be one of SNAT, DSR, Hybrid; got "dsr"'),
    ("wrong-enum-tunnel", {"version": 1, "settings": {"tunnelMode": "Geneve"}},
     'spec.settings.tunnelMode: must be one of Disabled, VXLAN; got "Geneve"'),
    ("wrong-type-enum", {"version": 1, "settings": {"bpfLBMode": 1}},
     "spec.settings.bpfLBMode: must be one of SNAT, DSR, Hybrid; got 1"),
    ("wrong-type-bool", {"version": 1, "settings": {"debugLogging": "yes"}},
     'spec.settings.debugLogging: must be true or false; got "yes" (a string)'),
    ("wrong-type-enabled", {"enabled": "true", "version": 1},
     'spec.enabled: must be true or false; got "true" (a string)'),
    ("wrong-type-settings", {"version": 1, "settings": ["bpfLBMode"]},
     'spec.settings: must be a mapping; got ["bpfLBMode"] (a list)'),
    ("unknown-key", {"version": 1, "settings": {"bpfLbMode": "DSR"}},
     "spec.settings.bpfLbMode: unknown setting; known settings are bpfLBMode, tunnelMode,"),
    ("missing-version", {"settings": {"bpfLBMode": "DSR"}},
     "spec.version: required when spec.settings is set; expected 1"),
    ("wrong-version", {"version": 2, "settings": {"bpfLBMode": "DSR"}},
     "spec.version: unsupported settings schema version 2; expected 1"),
    ("non-integer-version", {"version": "1", "settings": {}},
     'spec.version: must be an integer; got "1" (a string)'),
    ("maglev-size", {"version": 1, "settings": {"maglevTableSize": 1000}},
     "spec.settings.maglevTableSize: must be one of 251, 509, 1021,"),
]


@pytest.mark.parametrize(("spec", "message"), [(s, m) for _, s, m in BAD], ids=[i for i, _, _ in BAD])
def test_bad_configurations_are_denied_with_field_allowed_values_and_given(
        webhook: Callable[..., Any], spec: dict[str, Any], message: str) -> None:
    assert message in denied(webhook(spec))


def test_every_problem_is_named_in_one_answer(webhook: Callable[..., Any]) -> None:
    text = denied(webhook({"version": 1, "settings": {"bpfLBMode": "dsr", "tunnelMode": "vxlan", "x": 1}}))
    assert 'bpfLBMode: must be one of SNAT, DSR, Hybrid; got "dsr"' in text
    assert 'tunnelMode: must be one of Disabled, VXLAN; got "vxlan"' in text
    assert "spec.settings.x: unknown setting" in text


@pytest.mark.parametrize("mode", ["SNAT", "DSR", "Hybrid"])
def test_vxlan_is_accepted_with_every_mode(webhook: Callable[..., Any], mode: str) -> None:
    """Deckhouse forces SNAT with VXLAN (Cilium cannot do DSR over it); bpflb's datapath runs every mode
    over VXLAN, so each combination is admitted as it is, without a warning."""
    answer = webhook({"version": 1, "settings": {"bpfLBMode": mode, "tunnelMode": "VXLAN"}})
    assert answer["allowed"] is True, answer
    assert not answer.get("warnings")


@pytest.mark.parametrize("acceleration", ["Disabled", "Native", "BestEffort"])
def test_every_acceleration_is_admitted_without_warnings(webhook: Callable[..., Any], acceleration: str) -> None:
    answer = webhook({"version": 1, "settings": {"xdpAcceleration": acceleration}})
    assert answer["allowed"] is True
    assert not answer.get("warnings")


def test_other_module_configs_and_deletions_are_not_ours(webhook: Callable[..., Any]) -> None:
    assert webhook({"version": 3, "settings": {"anything": True}}, name="prometheus")["allowed"] is True
