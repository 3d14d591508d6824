"""RBAC read from the rendered chart: nobody gets a wildcard or a Secret; the agents read only Services,
EndpointSlices, Nodes and their ConfigMap, and write only their own node's report; the operator writes only
what it manages.

The agents' one write permission (create/patch of ConfigMaps in kube-system) is as wide as RBAC can make
it: every agent shares a ServiceAccount and RBAC cannot name "this pod's node". The chart's
ValidatingAdmissionPolicy narrows it to bpflb-node-<node>; its CEL is executed here (cel-python) against
the requests an agent, a stolen agent token and others could send."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import celpy
import pytest
from celpy.adapter import json_to_cel
from celpy.evaluation import CELEvalError

from tests.chart.helpers import Doc, documents, find

READ = frozenset({"get", "list", "watch"})
WRITE = frozenset({"create", "update", "patch", "delete", "deletecollection", "escalate", "bind", "impersonate",
                   "approve", "sign", "use"})
AGENT = "system:serviceaccount:kube-system:bpflb-agent"
OPERATOR = "system:serviceaccount:kube-system:bpflb-operator"


@dataclass(frozen=True)
class Grant:
    """One verb on one resource, as a subject holds it."""

    namespace: str | None         # None: cluster-wide (ClusterRole through a ClusterRoleBinding)
    group: str
    resource: str
    verb: str
    names: tuple[str, ...]        # resourceNames; () means every object


def grants(docs: list[Doc], subject: str) -> set[Grant]:
    """Every grant a ServiceAccount holds through the rendered bindings."""
    roles = {(d["kind"], d["metadata"].get("namespace"), d["metadata"]["name"]): d
             for d in docs if d["kind"] in ("Role", "ClusterRole")}
    out: set[Grant] = set()
    for binding in (d for d in docs if d["kind"] in ("RoleBinding", "ClusterRoleBinding")):
        names = {f"system:serviceaccount:{s['namespace']}:{s['name']}"
                 for s in binding["subjects"] if s["kind"] == "ServiceAccount"}
        if subject not in names:
            continue
        where = binding["metadata"].get("namespace")
        ref = binding["roleRef"]
        role = roles[(ref["kind"], where if ref["kind"] == "Role" else None, ref["name"])]
        for rule in role["rules"]:
            for group in rule["apiGroups"]:
                for resource in rule["resources"]:
                    for verb in rule["verbs"]:
                        out.add(Grant(where, group, resource, verb, tuple(rule.get("resourceNames", ()))))
    return out


@pytest.fixture(scope="module")
def docs() -> list[Doc]:
    return documents()


def test_nobody_gets_a_wildcard_or_a_secret(docs: list[Doc]) -> None:
    roles = [d for d in docs if d["kind"] in ("Role", "ClusterRole")]
    assert roles
    for role in roles:
        assert "aggregationRule" not in role
        for rule in role["rules"]:
            for key in ("apiGroups", "resources", "verbs", "resourceNames", "nonResourceURLs"):
                assert not any("*" in item for item in rule.get(key, [])), (role["metadata"]["name"], rule)
            assert "secrets" not in rule["resources"], (role["metadata"]["name"], rule)
            assert not set(rule["verbs"]) & {"escalate", "bind", "impersonate"}, rule


def test_the_agents_read_only_what_they_load_balance(docs: list[Doc]) -> None:
    reads = {(g.namespace, g.group, g.resource, g.names) for g in grants(docs, AGENT) if g.verb in READ}
    assert reads == {
        (None, "", "services", ()),
        (None, "", "nodes", ()),
        (None, "discovery.k8s.io", "endpointslices", ()),
        ("kube-system", "", "configmaps", ("bpflb-agent",)),
    }


def test_the_agents_write_only_their_node_reports(docs: list[Doc]) -> None:
    """RBAC's part: ConfigMaps in kube-system, create and patch, and Events (about the Services a node refuses),
    nothing else; the admission policy's part: bound to every request of the agents' ServiceAccount."""
    writes = {g for g in grants(docs, AGENT) if g.verb not in READ}
    assert writes == {Grant("kube-system", "", "configmaps", "create", ()),
                      Grant("kube-system", "", "configmaps", "patch", ()),
                      Grant(None, "", "events", "create", ())}
    policy = find(docs, "ValidatingAdmissionPolicy", "bpflb-agent-node-report")
    binding = find(docs, "ValidatingAdmissionPolicyBinding", "bpflb-agent-node-report")
    assert binding["spec"]["policyName"] == "bpflb-agent-node-report"
    assert binding["spec"]["validationActions"] == ["Deny"] and "matchResources" not in binding["spec"]
    assert policy["spec"]["failurePolicy"] == "Fail"
    [rule] = policy["spec"]["matchConstraints"]["resourceRules"]
    assert rule["resources"] == ["configmaps"] and set(rule["operations"]) >= {"CREATE", "UPDATE", "DELETE"}


def test_the_operator_writes_only_what_it_manages(docs: list[Doc]) -> None:
    writes = {(g.namespace, g.group, g.resource, g.verb, g.names)
              for g in grants(docs, OPERATOR) if g.verb not in READ}
    assert writes == {
        (None, "deckhouse.io", "moduleconfigs", "patch", ("cni-cilium",)),          # kopf's annotations
        (None, "deckhouse.io", "moduleconfigs/status", "patch", ("cni-cilium",)),
        (None, "admissionregistration.k8s.io", "validatingwebhookconfigurations", "patch", ("bpflb-webhook",)),
        ("kube-system", "", "configmaps", "create", ()),
        ("kube-system", "", "configmaps", "patch", ("bpflb-agent",)),
        ("kube-system", "", "configmaps", "update", ("bpflb-agent",)),
        ("kube-system", "", "configmaps", "delete", ()),       # node reports of Nodes gone; see its policy
        ("kube-system", "coordination.k8s.io", "leases", "create", ()),
        ("kube-system", "coordination.k8s.io", "leases", "patch", ("bpflb-operator",)),
        ("kube-system", "coordination.k8s.io", "leases", "update", ("bpflb-operator",)),
        ("kube-system", "apps", "daemonsets", "create", ()),
        ("kube-system", "apps", "daemonsets", "patch", ("bpflb-agent",)),
        ("kube-system", "apps", "daemonsets", "update", ("bpflb-agent",)),
        ("kube-system", "apps", "daemonsets", "delete", ("bpflb-agent",)),
        ("default", "", "events", "create", ()),                                     # about the ModuleConfig
    }
    reads = {(g.namespace, g.resource) for g in grants(docs, OPERATOR) if g.verb in READ}
    assert {r for _, r in reads} <= {"moduleconfigs", "nodes", "namespaces", "customresourcedefinitions",
                                      "validatingwebhookconfigurations", "configmaps", "daemonsets", "leases"}


# ---------------------------------------------------------------------------------------------------------
# The admission policy, executed.


class Policy:
    """A ValidatingAdmissionPolicy evaluated the way the API server does: matchConditions (all true, else the
    policy does not apply), then variables in order, then every validation; an evaluation error counts as
    failurePolicy says (Fail: denied)."""

    def __init__(self, doc: Doc) -> None:
        self.spec = doc["spec"]
        self.env = celpy.Environment()

    def _eval(self, expression: str, activation: dict[str, Any]) -> Any:
        return self.env.program(self.env.compile(expression)).evaluate(activation)

    def admit(self, request: dict[str, Any]) -> tuple[bool, str]:
        activation: dict[str, Any] = {
            "request": json_to_cel(request),
            "object": json_to_cel(request.get("object")),
            "oldObject": json_to_cel(request.get("oldObject")),
        }
        for condition in self.spec.get("matchConditions", []):
            if not bool(self._eval(condition["expression"], activation)):
                return True, "not matched"
        variables: dict[str, Any] = {}
        for variable in self.spec.get("variables", []):
            variables[variable["name"]] = self._eval(variable["expression"],
                                                     {**activation, "variables": json_to_cel(variables)})
        activation["variables"] = celpy.celtypes.MapType(
            {celpy.celtypes.StringType(k): v for k, v in variables.items()})
        for validation in self.spec["validations"]:
            try:
                allowed = bool(self._eval(validation["expression"], activation))
            except CELEvalError as exc:
                assert self.spec["failurePolicy"] == "Fail"
                return False, f"evaluation error: {exc}"
            if not allowed:
                if "messageExpression" in validation:
                    return False, str(self._eval(validation["messageExpression"], activation))
                return False, " ".join(validation["message"].split())
        return True, "allowed"


def request(operation: str, name: str, *, node: str | None = "node1", data_node: str | None = "node1",
            user: str = AGENT, namespace: str = "kube-system") -> dict[str, Any]:
    extra = {"authentication.kubernetes.io/node-name": [node]} if node else {}
    obj = None
    if operation != "DELETE":
        obj = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name, "namespace": namespace},
               "data": {"state": "Ready", **({"node": data_node} if data_node else {})}}
    return {"operation": operation, "name": name, "namespace": namespace,
            "userInfo": {"username": user, "extra": extra}, "object": obj, "oldObject": None}


CASES = [
    # (what, request, allowed, message part)
    ("its own report, created", request("CREATE", "bpflb-node-node1"), True, "allowed"),
    ("its own report, patched", request("UPDATE", "bpflb-node-node1"), True, "allowed"),
    ("another node's report", request("UPDATE", "bpflb-node-node2"), False,
     ("bpflb-agent on node node1 may write only the ConfigMap kube-system/bpflb-node-node1, "
      "not kube-system/bpflb-node-node2 (UPDATE)")),
    ("a report under its own name posing as another node", request("UPDATE", "bpflb-node-node1", data_node="node2"),
     False, "bpflb-agent on node node1 must report as itself: data.node must be node1"),
    ("a report without data.node", request("CREATE", "bpflb-node-node1", data_node=None), False,
     "must report as itself"),
    ("the agents' configuration", request("UPDATE", "bpflb-agent"), False, "not kube-system/bpflb-agent"),
    ("kube-system's other ConfigMaps", request("UPDATE", "coredns"), False, "not kube-system/coredns"),
    ("a ConfigMap elsewhere", request("CREATE", "bpflb-node-node1", namespace="default"), False,
     "not default/bpflb-node-node1"),
    ("its own report, deleted", request("DELETE", "bpflb-node-node1"), False, "may write only"),
    ("a token bound to no node (a leaked token used outside a pod)", request("UPDATE", "bpflb-node-node1", node=None),
     False, "this request's token names no node"),
    ("the operator (not the policy's business)", request("UPDATE", "coredns", user=OPERATOR, node=None), True,
     "not matched"),
    ("an administrator", request("UPDATE", "bpflb-node-node2", user="kubernetes-admin", node=None), True,
     "not matched"),
]


@pytest.mark.parametrize(("what", "req", "allowed", "message"), CASES, ids=[c[0] for c in CASES])
def test_the_admission_policy_confines_each_agent_to_its_own_report(
        docs: list[Doc], what: str, req: dict[str, Any], allowed: bool, message: str) -> None:
    verdict, why = Policy(find(docs, "ValidatingAdmissionPolicy", "bpflb-agent-node-report")).admit(req)
    assert (verdict, message in why) == (allowed, True), (what, why)


def test_the_policy_follows_the_agents_service_account_name() -> None:
    docs = documents({"serviceAccounts": {"agent": {"create": True, "name": "lb-agent"}}})
    policy = Policy(find(docs, "ValidatingAdmissionPolicy", "bpflb-agent-node-report"))
    user = "system:serviceaccount:kube-system:lb-agent"
    assert policy.admit(request("UPDATE", "coredns", user=user))[0] is False
    assert policy.admit(request("UPDATE", "coredns"))[1] == "not matched"
    assert {g.resource for g in grants(docs, user)} == {"services", "nodes", "endpointslices", "configmaps", "events"}


OPERATOR_CASES = [
    ("a node report", request("DELETE", "bpflb-node-node3", user=OPERATOR, node=None), True, "allowed"),
    ("the agents' configuration", request("DELETE", "bpflb-agent", user=OPERATOR, node=None), False,
     "bpflb-operator deletes only node reports (kube-system/bpflb-node-<node>), not kube-system/bpflb-agent"),
    ("another namespace's ConfigMap", request("DELETE", "bpflb-node-x", user=OPERATOR, node=None, namespace="default"),
     False, "not default/bpflb-node-x"),
    ("an agent (not this policy's business)", request("DELETE", "bpflb-agent"), True, "not matched"),
]


@pytest.mark.parametrize(("what", "req", "allowed", "message"), OPERATOR_CASES, ids=[c[0] for c in OPERATOR_CASES])
def test_the_operator_deletes_only_node_reports(docs: list[Doc], what: str, req: dict[str, Any], allowed: bool,
                                                message: str) -> None:
    verdict, why = Policy(find(docs, "ValidatingAdmissionPolicy", "bpflb-operator-report-cleanup")).admit(req)
    assert (verdict, message in why) == (allowed, True), (what, why)
    binding = find(docs, "ValidatingAdmissionPolicyBinding", "bpflb-operator-report-cleanup")
    assert binding["spec"] == {"policyName": "bpflb-operator-report-cleanup", "validationActions": ["Deny"]}


def test_the_report_the_agent_writes_passes_the_policy(docs: list[Doc]) -> None:
    """What NodeReporter really sends (the create body, and the merge patch applied to it) is admitted."""
    from bpflb.control.report import LABELS, report_name

    data = {"node": "node1", "state": "Ready", "bpfLBMode": "DSR", "updated": "2026-11-21T00:00:00.000000Z"}
    created = {"apiVersion": "v1", "kind": "ConfigMap",
               "metadata": {"name": report_name("node1"), "namespace": "kube-system", "labels": LABELS},
               "data": data}
    req = request("CREATE", report_name("node1"))
    req["object"] = created
    assert Policy(find(docs, "ValidatingAdmissionPolicy", "bpflb-agent-node-report")).admit(req) == (True, "allowed")
