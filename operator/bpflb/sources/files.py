"""A Source reading Kubernetes manifests (YAML/JSON) from one directory, polled for changes."""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from bpflb.sources.base import AGENT_CONFIG_NAME, AGENT_CONFIG_NAMESPACE, KubeObject, Snapshot

try:
    _Loader: type[yaml.SafeLoader | yaml.CSafeLoader] = yaml.CSafeLoader
except AttributeError:      # PyYAML built without libyaml: correct, only slower
    _Loader = yaml.SafeLoader

SUFFIXES = (".yaml", ".yml", ".json")
POLL_INTERVAL = 0.1          # seconds between two looks at the directory in wait_for_change

# kind -> the apiVersion it must have; another apiVersion with the same kind is a different resource
# (a Knative "Service", say) and is ignored like any unknown kind.
_KINDS: dict[str, str] = {
    "Service": "v1",
    "EndpointSlice": "discovery.k8s.io/v1",
    "Node": "v1",
    "ConfigMap": "v1",
}
# What a document can raise besides YAMLError: ValueError for an impossible date (2024-13-01),
# RecursionError for absurd nesting.
_PARSE_ERRORS = (yaml.YAMLError, ValueError, RecursionError)
_OLD_API_VERSIONS = {("EndpointSlice", "discovery.k8s.io/v1beta1")}
_TYPED_LISTS = {f"{kind}List": kind for kind in _KINDS}          # what the API server returns for a list
_DOCUMENT_START = re.compile(r"^---(?=\s|$)", re.MULTILINE)
_MAX_LIST_DEPTH = 4

Signature = tuple[int, tuple[tuple[str, int, int, int], ...]]


def _is_manifest_name(name: str) -> bool:
    """True for the file names the source reads; hidden files and editor backups are skipped."""
    return not name.startswith(".") and not name.endswith("~") and name.endswith(SUFFIXES)


def _describe_yaml_error(error: Exception, first_line: int) -> str:
    """Return a YAML error on one line with file line numbers: where, what, and in which construct."""
    if not isinstance(error, yaml.MarkedYAMLError) or error.problem_mark is None:
        return " ".join(str(error).split())
    mark = error.problem_mark
    text = f"line {first_line + mark.line}, column {mark.column + 1}: {error.problem}"
    if error.context:
        where = error.context_mark
        at = f" at line {first_line + where.line}, column {where.column + 1}" if where is not None else ""
        text += f" ({error.context}{at})"
    return text


class FileSource:
    """Reads Service, EndpointSlice, Node and the agent ConfigMap from *.yaml, *.yml, *.json in a directory.

    Files are read in name order, non-recursively. A file may hold several YAML documents and documents
    may be `kind: List` (or `ServiceList`, ...) with items. Unreadable files or documents are recorded
    in Snapshot.problems with the path; every other object is still used. Objects of other kinds are
    ignored. When the same object (kind, namespace, name) appears twice the first one is kept.

    A file is parsed again only when its mtime, size or inode changed; unchanged files give the same
    object dicts as in the previous snapshot, so consumers must treat snapshot objects as read-only.
    """

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        self._last: Signature | None = None
        # file name -> (mtime_ns, size, inode) when parsed, its objects, its problems
        self._parsed: dict[str, tuple[tuple[int, int, int], list[tuple[str, KubeObject]], list[str]]] = {}

    # -- change detection --------------------------------------------------------------------------------

    def _files(self) -> list[tuple[str, os.stat_result]]:
        """Return (name, stat) of the manifest files, following symlinks (ConfigMap volumes use them)."""
        found: list[tuple[str, os.stat_result]] = []
        with os.scandir(self.directory) as entries:
            for entry in entries:
                if not _is_manifest_name(entry.name):
                    continue
                try:
                    if entry.is_file():
                        found.append((entry.name, entry.stat()))
                except OSError:
                    continue        # vanished or a dangling symlink; snapshot() reports unreadable files
        found.sort(key=lambda pair: pair[0])
        return found

    def signature(self) -> Signature:
        """Return a cheap fingerprint of the directory; it changes when a manifest may have changed."""
        try:
            dir_mtime = os.stat(self.directory).st_mtime_ns
            files = self._files()
        except OSError:
            return (-1, ())
        return dir_mtime, tuple((name, st.st_mtime_ns, st.st_size, st.st_ino) for name, st in files)

    def wait_for_change(self, timeout: float) -> bool:
        """Poll every 0.1 s for up to timeout seconds; True once the directory differs from the last read."""
        deadline = time.monotonic() + max(timeout, 0.0)
        while True:
            if self.signature() != self._last:
                return True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            time.sleep(min(POLL_INTERVAL, remaining))

    # -- reading -----------------------------------------------------------------------------------------

    def snapshot(self) -> Snapshot:
        """Read every manifest file now; never raises for bad content, records it in problems."""
        # Taken before reading, so that a write racing with the read is seen by the next wait_for_change().
        self._last = self.signature()
        snap = Snapshot()
        try:
            if not self.directory.is_dir():
                snap.problems.append(f"{self.directory}: not a directory; no objects read")
                return snap
            files = self._files()
        except OSError as error:
            snap.problems.append(f"{self.directory}: cannot list the directory: {error.strerror or error}")
            return snap

        seen: set[tuple[str, str, str]] = set()
        parsed = {}
        for name, st in files:
            stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
            cached = self._parsed.get(name)
            if cached is None or cached[0] != stamp:
                problems: list[str] = []
                cached = (stamp, list(self._objects(self.directory / name, problems)), problems)
            parsed[name] = cached
            snap.problems.extend(cached[2])
            for where, obj in cached[1]:
                self._add(snap, where, obj, seen)
        self._parsed = parsed
        return snap

    def _objects(self, path: Path, problems: list[str]) -> Iterator[tuple[str, KubeObject]]:
        """Yield (location for messages, object) for every Kubernetes object in one file."""
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            problems.append(f"{path}: cannot read: {error}")
            return
        for number, document in self._documents(path, text, problems):
            where = f"{path} (document {number})" if number else str(path)
            yield from self._flatten(where, document, problems, None, 0)

    def _documents(self, path: Path, text: str, problems: list[str]) -> list[tuple[int, Any]]:
        """Return (1-based document number, or 0 for a JSON file; parsed document) for one file."""
        if path.suffix == ".json":
            try:
                return [(0, json.loads(text))]
            except (ValueError, RecursionError) as error:     # JSONDecodeError is a ValueError
                problems.append(f"{path}: invalid JSON: {error}")
                return []
        try:
            return list(enumerate(yaml.load_all(text, Loader=_Loader), start=1))
        except _PARSE_ERRORS:
            pass
        # One broken document must not hide the others: parse them one by one to find which is bad.
        documents: list[tuple[int, Any]] = []
        starts = [m.start() for m in _DOCUMENT_START.finditer(text)]
        if not starts or starts[0] != 0:
            starts.insert(0, 0)
        chunks = [text[a:b] for a, b in zip(starts, starts[1:] + [len(text)], strict=True)]
        for number, chunk in enumerate(chunks, start=1):
            try:
                documents.extend((number, doc) for doc in yaml.load_all(chunk, Loader=_Loader))
            except _PARSE_ERRORS as error:
                first_line = text.count("\n", 0, starts[number - 1]) + 1
                problems.append(f"{path} (document {number}): invalid YAML: "
                                f"{_describe_yaml_error(error, first_line)}")
        return documents

    def _flatten(self, where: str, document: Any, problems: list[str], default_kind: str | None,
                 depth: int) -> Iterator[tuple[str, KubeObject]]:
        """Yield the objects of one document, unpacking List and <Kind>List."""
        if document is None:
            return                          # an empty document, e.g. a trailing '---'
        if not isinstance(document, dict):
            problems.append(f"{where}: not a Kubernetes object: expected a mapping with apiVersion and kind, "
                            f"got a {type(document).__name__}")
            return
        kind = document.get("kind", default_kind)
        if kind is None:
            problems.append(f"{where}: not a Kubernetes object: no kind")
            return
        if kind == "List" or kind in _TYPED_LISTS:
            items = document.get("items")
            if items is None:
                return
            if not isinstance(items, list) or depth >= _MAX_LIST_DEPTH:
                problems.append(f"{where}: {kind}.items must be a list of objects")
                return
            item_kind = _TYPED_LISTS.get(kind)
            for i, item in enumerate(items):
                if item_kind is not None and isinstance(item, dict) and "kind" not in item:
                    item = {"apiVersion": document.get("apiVersion"), "kind": item_kind, **item}
                yield from self._flatten(f"{where} items[{i}]", item, problems, None, depth + 1)
            return
        yield where, document

    @staticmethod
    def _add(snap: Snapshot, where: str, obj: KubeObject, seen: set[tuple[str, str, str]]) -> None:
        """Put one object into the snapshot list of its kind (or config), reporting what cannot be used."""
        kind = obj.get("kind")
        if not isinstance(kind, str) or kind not in _KINDS:
            return
        api_version = obj.get("apiVersion")
        expected = _KINDS[kind]
        if (kind, api_version) in _OLD_API_VERSIONS:
            snap.problems.append(f"{where}: {kind} {api_version} is not supported; expected {expected}")
            return
        if api_version is not None and api_version != expected:
            return                          # same kind name, another API group: not ours
        metadata = obj.get("metadata")
        name = metadata.get("name") if isinstance(metadata, dict) else None
        namespace = metadata.get("namespace") if isinstance(metadata, dict) else None
        if kind == "Node":
            namespace = ""
        elif not isinstance(namespace, str) or not namespace:
            namespace = "default"
        if isinstance(name, str):          # a nameless object is reported by the translation, with its field
            identity = (kind, namespace, name)
            if identity in seen:
                shown = f"{namespace}/{name}" if namespace else name
                snap.problems.append(f"{where}: duplicate {kind} {shown}; the first one read is used")
                return
            seen.add(identity)

        if kind == "Service":
            snap.services.append(obj)
        elif kind == "EndpointSlice":
            snap.endpointslices.append(obj)
        elif kind == "Node":
            snap.nodes.append(obj)
        elif name == AGENT_CONFIG_NAME:
            if namespace != AGENT_CONFIG_NAMESPACE:
                snap.problems.append(f"{where}: ConfigMap {namespace}/{name} is not the agent configuration; "
                                     f"it must be in namespace {AGENT_CONFIG_NAMESPACE}")
                return
            data = obj.get("data")
            if data is None:
                snap.config = {}
            elif not isinstance(data, dict):
                snap.problems.append(f"{where}: ConfigMap {namespace}/{name}: data must be a mapping of "
                                     f"strings; got a {type(data).__name__}")
                snap.config = {}
            else:
                # Kubernetes only stores strings; an unquoted `true` or `1` is passed on as its text so that
                # the translation rejects it by name instead of the key silently vanishing.
                snap.config = {str(k): v if isinstance(v, str) else json.dumps(v, default=str)
                               for k, v in data.items()}
