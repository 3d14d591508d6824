"""Unit tests of bpflb.sources.files.FileSource over a temporary directory of manifests."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from bpflb.model.translate import translate
from bpflb.sources.base import Source
from bpflb.sources.files import FileSource

SERVICE = """\
apiVersion: v1
kind: Service
metadata:
  name: {name}
  namespace: default
spec:
  type: NodePort
  selector: {{app: {name}}}
  ports:
  - {{name: http, port: 80, nodePort: {node_port}}}
"""

SLICE = """\
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: {name}-abc
  namespace: default
  labels: {{kubernetes.io/service-name: {name}}}
addressType: IPv4
ports: [{{name: http, port: 8080, protocol: TCP}}]
endpoints:
- addresses: [10.0.1.1]
  nodeName: node-a
  conditions: {{ready: true}}
"""

NODE = """\
apiVersion: v1
kind: Node
metadata: {name: node-a}
status:
  addresses:
  - {type: InternalIP, address: 192.168.0.10}
"""

CONFIG = """\
apiVersion: v1
kind: ConfigMap
metadata: {name: bpflb-agent, namespace: kube-system}
data:
  bpfLBMode: DSR
  lbAlgorithm: Maglev
"""


def write(path: Path, text: str) -> None:
    path.write_text(text, encoding="utf-8")


def bump(path: Path, text: str) -> None:
    """Rewrite a file so that its mtime surely differs from the previous write."""
    before = path.stat().st_mtime_ns
    write(path, text)
    os.utime(path, ns=(before + 1_000_000_000, before + 1_000_000_000))


def test_is_a_source(tmp_path: Path) -> None:
    source: Source = FileSource(tmp_path)
    assert source.snapshot().services == []


def test_multi_document_file(tmp_path: Path) -> None:
    docs = [SERVICE.format(name="echo", node_port=30080), SLICE.format(name="echo"), NODE, CONFIG]
    text = "---\n".join(docs)
    write(tmp_path / "all.yaml", text + "---\n")
    snap = FileSource(tmp_path).snapshot()
    assert [s["metadata"]["name"] for s in snap.services] == ["echo"]
    assert [s["metadata"]["name"] for s in snap.endpointslices] == ["echo-abc"]
    assert [n["metadata"]["name"] for n in snap.nodes] == ["node-a"]
    assert snap.config == {"bpfLBMode": "DSR", "lbAlgorithm": "Maglev"}
    assert snap.problems == []

    state = translate(snap, "node-a")
    assert state.problems == []
    assert len(state.frontends) == 1
    assert [str(b.l4) for b in next(iter(state.frontends.values())).backends] == ["10.0.1.1:8080/TCP"]


def test_list_kinds_and_json(tmp_path: Path) -> None:
    listed = ("apiVersion: v1\nkind: List\nitems:\n"
              + "".join("- " + SERVICE.format(name=n, node_port=p).replace("\n", "\n  ").rstrip() + "\n"
                        for n, p in (("a", 30001), ("b", 30002))))
    write(tmp_path / "list.yml", listed)
    api_list = {"apiVersion": "v1", "kind": "NodeList",
                "items": [{"metadata": {"name": "node-a"}}, {"metadata": {"name": "node-b"}}]}
    write(tmp_path / "nodes.json", json.dumps(api_list, indent="\t"))
    snap = FileSource(tmp_path).snapshot()
    assert [s["metadata"]["name"] for s in snap.services] == ["a", "b"]
    kinds_and_names = [(n["kind"], n["metadata"]["name"]) for n in snap.nodes]
    assert kinds_and_names == [("Node", "node-a"), ("Node", "node-b")]
    assert snap.problems == []


def test_unknown_kinds_other_configmaps_hidden_and_backup_files_ignored(tmp_path: Path) -> None:
    write(tmp_path / "deploy.yaml", "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: x}\n")
    write(tmp_path / "knative.yaml",
          "apiVersion: serving.knative.dev/v1\nkind: Service\nmetadata: {name: k}\n")
    write(tmp_path / "cm.yaml",
          "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: other, namespace: kube-system}\n"
          "data: {bpfLBMode: DSR}\n")
    write(tmp_path / ".hidden.yaml", SERVICE.format(name="hidden", node_port=30001))
    write(tmp_path / "svc.yaml~", SERVICE.format(name="backup", node_port=30002))
    write(tmp_path / "notes.txt", "not: [yaml")
    (tmp_path / "sub.yaml").mkdir()
    snap = FileSource(tmp_path).snapshot()
    assert snap.services == [] and snap.config is None
    assert snap.problems == []


def test_bad_yaml_is_recorded_and_other_files_and_documents_are_used(tmp_path: Path) -> None:
    write(tmp_path / "a-bad.yaml", "apiVersion: v1\nkind: Service\nmetadata: {name: [unclosed\n")
    mixed = "---\n".join([SERVICE.format(name="one", node_port=30001), "kind: Service\n  bad: indent\n: :\n",
                          SERVICE.format(name="three", node_port=30003)])
    write(tmp_path / "b-mixed.yaml", mixed)
    write(tmp_path / "c-bad.json", "{\"kind\": ")
    write(tmp_path / "d-good.yaml", SERVICE.format(name="good", node_port=30004) + "---\n- just\n- a list\n")
    snap = FileSource(tmp_path).snapshot()
    assert sorted(s["metadata"]["name"] for s in snap.services) == ["good", "one", "three"]
    assert len(snap.problems) == 4, snap.problems
    bad, mixed_problem, json_problem, not_object = snap.problems
    assert str(tmp_path / "a-bad.yaml") in bad and "invalid YAML" in bad and "line" in bad
    assert str(tmp_path / "b-mixed.yaml") in mixed_problem and "document 2" in mixed_problem
    assert str(tmp_path / "c-bad.json") in json_problem and "invalid JSON" in json_problem
    assert str(tmp_path / "d-good.yaml") in not_object and "not a Kubernetes object" in not_object


def test_duplicates_and_misplaced_agent_config(tmp_path: Path) -> None:
    write(tmp_path / "a.yaml", SERVICE.format(name="echo", node_port=30001))
    write(tmp_path / "b.yaml", SERVICE.format(name="echo", node_port=30002))
    write(tmp_path / "c.yaml", CONFIG.replace("namespace: kube-system", "namespace: default"))
    snap = FileSource(tmp_path).snapshot()
    assert [s["spec"]["ports"][0]["nodePort"] for s in snap.services] == [30001]
    assert any("duplicate Service default/echo" in p and "b.yaml" in p for p in snap.problems)
    assert any("ConfigMap default/bpflb-agent is not the agent configuration" in p for p in snap.problems)
    assert snap.config is None


def test_unquoted_config_values_reach_the_translation_as_text(tmp_path: Path) -> None:
    write(tmp_path / "cm.yaml", CONFIG.replace("bpfLBMode: DSR", "bpfLBMode: true"))
    snap = FileSource(tmp_path).snapshot()
    assert snap.config == {"bpfLBMode": "true", "lbAlgorithm": "Maglev"}
    problems = [str(p) for p in translate(snap, "node-a").problems]
    expected = ('ConfigMap kube-system/bpflb-agent: data.bpfLBMode: '
                'must be one of SNAT, DSR, Hybrid; got "true"')
    assert expected in problems


def test_missing_directory_is_a_problem(tmp_path: Path) -> None:
    source = FileSource(tmp_path / "nope")
    snap = source.snapshot()
    assert snap.services == [] and "not a directory" in snap.problems[0]
    assert source.wait_for_change(0) is False
    (tmp_path / "nope").mkdir()
    assert source.wait_for_change(0.5) is True


def test_change_detection(tmp_path: Path) -> None:
    svc = tmp_path / "svc.yaml"
    write(svc, SERVICE.format(name="echo", node_port=30001))
    source = FileSource(tmp_path)
    assert source.wait_for_change(0) is True            # never read yet
    source.snapshot()
    started = time.monotonic()
    assert source.wait_for_change(0.25) is False
    assert time.monotonic() - started >= 0.2

    bump(svc, SERVICE.format(name="echo", node_port=30002))
    assert source.wait_for_change(1.0) is True
    assert source.wait_for_change(0) is True             # still differs until the next snapshot
    assert source.snapshot().services[0]["spec"]["ports"][0]["nodePort"] == 30002
    assert source.wait_for_change(0) is False

    write(tmp_path / "new.yaml", SLICE.format(name="echo"))
    assert source.wait_for_change(1.0) is True
    assert len(source.snapshot().endpointslices) == 1

    (tmp_path / "new.yaml").unlink()
    assert source.wait_for_change(1.0) is True
    assert source.snapshot().endpointslices == []

    write(tmp_path / ".swap", "x")                       # ignored name, but the directory changed: re-read
    assert source.wait_for_change(1.0) is True
    source.snapshot()
    assert source.wait_for_change(0.15) is False


def test_unchanged_files_are_not_parsed_again(tmp_path: Path) -> None:
    write(tmp_path / "a.yaml", SERVICE.format(name="a", node_port=30001))
    write(tmp_path / "b.yaml", SERVICE.format(name="b", node_port=30002))
    source = FileSource(tmp_path)
    first = source.snapshot()
    bump(tmp_path / "b.yaml", SERVICE.format(name="b", node_port=30003))
    second = source.snapshot()
    assert second.services[0] is first.services[0]
    assert second.services[1]["spec"]["ports"][0]["nodePort"] == 30003


def test_impossible_date_and_old_api_version_are_problems(tmp_path: Path) -> None:
    write(tmp_path / "a.yaml", SERVICE.format(name="a", node_port=30001)
          + "---\napiVersion: v1\nkind: Service\nmetadata: {name: b, creationTimestamp: 2024-13-01}\n")
    old_slice = SLICE.format(name="a").replace("discovery.k8s.io/v1", "discovery.k8s.io/v1beta1")
    write(tmp_path / "b.yaml", old_slice)
    snap = FileSource(tmp_path).snapshot()
    assert [s["metadata"]["name"] for s in snap.services] == ["a"]
    assert snap.endpointslices == []
    assert len(snap.problems) == 2, snap.problems
    assert "a.yaml (document 2): invalid YAML" in snap.problems[0] and "month" in snap.problems[0]
    assert "EndpointSlice discovery.k8s.io/v1beta1 is not supported" in snap.problems[1]
