"""Process supervision in the lab: every process it starts (agents, echo pods, the control plane's) runs in a
lab namespace through nsenter, with its log and its readiness file, a node's and its pods' in the node's
cgroup; starting, waiting for ready, restarting, and telling a live process from a dead one."""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import bpflb
from bpflb_lab.lab import cgroups, netns, topology
from bpflb_lab.lab.errors import LabError
from bpflb_lab.lab.parts import LabParts
from bpflb_lab.lab.state import LabState, PodRecord

ENV_AGENT_CMD = "BPFLB_LAB_AGENT_CMD"
# Metrics and probes on the node's own namespace (each node is a network namespace: the same port on each).
METRICS_PORT = 9962
DEFAULT_AGENT_CMD = ("{python} -m bpflb agent --node-name {node} --source-dir {source_dir} "
                     "--pin-root {pin_root} --device {device} --cgroup-root {cgroup_root} "
                     f"--metrics-listen 0.0.0.0:{METRICS_PORT}")
ECHO_START_TIMEOUT = 15.0
BPFFS = Path("/sys/fs/bpf")


def log_tail(path: Path, lines: int = 20) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return f"    ({path} is missing)"
    return "\n".join(f"    {line}" for line in text) if text else f"    ({path} is empty)"


def bpffs_mounted(path: Path = BPFFS) -> bool:
    with open("/proc/self/mounts") as f:
        return any(line.split()[1:3] == [str(path), "bpf"] for line in f)


def _pid_alive(pid: int | None, inode: int | None = None) -> bool:
    """pid runs (not a zombie), and, when inode is given, in that network namespace."""
    if not pid:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X"):
                return False
        if inode is not None:
            return os.readlink(f"/proc/{pid}/ns/net") == f"net:[{inode}]"
    except (OSError, IndexError):
        return False
    return True



class Supervision(LabParts):
    """Starting and watching the lab's processes (mixed into lab.core.Lab)."""

    def _child_env(self) -> dict[str, str]:
        env = dict(os.environ)
        src = str(Path(bpflb.__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join([src, *filter(None, [env.get("PYTHONPATH")])])
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def _spawn(self, ns: str, argv: list[str], log: Path, cgroup: Path | None = None,
               env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        log.parent.mkdir(parents=True, exist_ok=True)
        if cgroup is not None:
            argv = cgroups.join_argv(cgroup, argv)
        with open(log, "ab") as out:
            proc = subprocess.Popen(netns.nsenter_argv(ns, argv), stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True,
                                    env={**self._child_env(), **(env or {})})
        self._children[proc.pid] = proc
        return proc

    def _start_echo(self, rec: PodRecord) -> subprocess.Popen[bytes]:
        ready = self.paths.pod_ready(rec.key)
        ready.unlink(missing_ok=True)
        argv = [sys.executable, "-m", "bpflb_lab.lab.echo", "--name", rec.name, "--ready-file", str(ready)]
        argv += [a for p in rec.tcp_ports for a in ("--http-port", str(p))]
        argv += [a for p in rec.udp_ports for a in ("--udp-port", str(p))]
        proc = self._spawn(rec.netns, argv, self.paths.pod_log(rec.key), cgroups.node_cgroup(self.name, rec.node))
        rec.echo_pid = proc.pid
        return proc

    def _wait_echo(self, started: list[tuple[PodRecord, subprocess.Popen[bytes]]]) -> None:
        deadline = time.monotonic() + ECHO_START_TIMEOUT
        waiting = list(started)
        while waiting:
            for rec, proc in list(waiting):
                if self.paths.pod_ready(rec.key).exists():
                    waiting.remove((rec, proc))
                elif proc.poll() is not None:
                    log = self.paths.pod_log(rec.key)
                    raise LabError(f"echo server of pod {rec.key} exited with code {proc.returncode}; "
                                   f"last lines of {log}:\n{log_tail(log)}")
            if waiting and time.monotonic() > deadline:
                raise LabError(f"echo servers of {', '.join(r.key for r, _ in waiting)} did not start within "
                               f"{ECHO_START_TIMEOUT:.0f}s")
            if waiting:
                time.sleep(0.02)

    def _agent_template(self, kube: bool = False) -> list[str]:
        if kube and self._agent_cmd is None:
            from bpflb_lab.lab.kube import KUBE_AGENT_CMD

            return shlex.split(KUBE_AGENT_CMD)
        template = self._agent_cmd if self._agent_cmd is not None else \
            os.environ.get(ENV_AGENT_CMD) or DEFAULT_AGENT_CMD
        return shlex.split(template) if isinstance(template, str) else list(template)

    def agent_argv(self, state: LabState, node: str) -> list[str]:
        """The agent command of one node, placeholders filled in (not yet wrapped in nsenter)."""
        values = {"python": sys.executable, "node": node, "source_dir": str(self.paths.cluster),
                  "pin_root": str(self.pin_root / node), "device": topology.DEVICE, "lab": self.name,
                  "netns": topology.ns_name(self.name, node), "mode": state.mode,
                  "log": str(self.paths.agent_log(node)), "kubeconfig": str(self.paths.root / "kubeconfig"),
                  "cgroup_root": str(cgroups.node_cgroup(self.name, node))}
        try:
            return [token.format(**values) for token in (state.agent_cmd or self._agent_template())]
        except (KeyError, IndexError, ValueError) as exc:
            raise LabError(f"agent command template: bad placeholder {exc} (known: "
                           f"{', '.join('{' + k + '}' for k in values)}; write {{{{ }}}} for literal braces)") from exc

    def _start_agents(self, state: LabState) -> None:
        if self.pin_root.is_relative_to(BPFFS) and not bpffs_mounted():
            netns.run(["mount", "-t", "bpf", "bpf", str(BPFFS)])
            self._log(f"mounted bpffs at {BPFFS}")
        if self.pin_root.exists():
            shutil.rmtree(self.pin_root)
        self.pin_root.mkdir(parents=True)
        for k in range(1, state.nodes + 1):
            node = topology.node_name(k)
            argv = self.agent_argv(state, node)
            proc = self._spawn(topology.ns_name(self.name, node), argv, self.paths.agent_log(node),
                               cgroups.node_cgroup(self.name, node))
            state.agent_pids[node] = proc.pid
            self._log(f"agent {node}: pid {proc.pid}, log {self.paths.agent_log(node)}")
        state.save(self.paths)

    def _wait_agents(self, state: LabState, timeout: float) -> None:
        start = time.monotonic()
        waiting = dict(sorted(state.agent_pids.items()))
        self._log(f"waiting up to {timeout:.0f}s for {len(waiting)} agent(s) to write <pin-root>/ready")
        last_note = start
        while waiting:
            for node, pid in list(waiting.items()):
                log = self.paths.agent_log(node)
                if os.path.lexists(self.pin_root / node / "ready"):
                    del waiting[node]
                    self._log(f"agent {node} ready ({time.monotonic() - start:.1f}s)")
                    continue
                proc = self._children.get(pid)
                code = proc.poll() if proc else (None if _pid_alive(pid) else "?")
                if code is not None:
                    raise LabError(f"agent on {node} exited (code {code}) before it was ready; "
                                   f"last lines of {log}:\n{log_tail(log)}")
            now = time.monotonic()
            if waiting and now - start > timeout:
                tails = "\n".join(f"  {n}: {self.paths.agent_log(n)}\n{log_tail(self.paths.agent_log(n), 10)}"
                                  for n in waiting)
                raise LabError(f"agents {', '.join(waiting)} not ready after {timeout:.0f}s:\n{tails}")
            if waiting and now - last_note >= 5:
                self._log(f"still waiting for {', '.join(waiting)} ({now - start:.0f}s/{timeout:.0f}s)")
                last_note = now
            if waiting:
                time.sleep(0.05)

    def restart_agent(self, node: str, timeout: float = 30.0, *, wrap: list[str] | None = None,
                      env: dict[str, str] | None = None, wait_ready: bool = True,
                      args: list[str] | None = None) -> int:
        """Stop a node's agent (SIGTERM: programs stay attached, maps stay pinned) and start it again;
        returns its pid once the new one has synced (it re-attaches its programs on the pinned maps).
        wrap: a command the agent runs under (e.g. `unshare -m --propagation slave --`: a fresh mount
        namespace, as a new pod gets); env: extra environment (e.g. BPFLB_BPF_DIR, another build of the
        objects); wait_ready=False returns at once (an agent expected not to get ready); args: added to the
        agent's command line."""
        state = self.state()
        old = state.agent_pids.get(node)
        if old is None:
            raise LabError(f"lab {self.name} runs no agent on {node}")
        proc = self._children.get(old)
        try:
            os.kill(old, signal.SIGTERM)
        except ProcessLookupError:
            pass
        if proc is not None:
            proc.wait(timeout=10)
        else:
            deadline = time.monotonic() + 10
            while _pid_alive(old) and time.monotonic() < deadline:
                time.sleep(0.05)
        marker = self.pin_root / node / "ready"
        if os.path.lexists(marker):
            marker.unlink()     # the old agent's; wait for the new one's
        new = self._spawn(topology.ns_name(self.name, node),
                          [*(wrap or []), *self.agent_argv(state, node), *(args or [])],
                          self.paths.agent_log(node), cgroups.node_cgroup(self.name, node), env)
        state.agent_pids[node] = new.pid
        state.save(self.paths)
        self._log(f"agent {node}: restarted as pid {new.pid}")
        if not wait_ready:
            return new.pid
        deadline = time.monotonic() + timeout
        while not os.path.lexists(self.pin_root / node / "ready"):
            if new.poll() is not None:
                raise LabError(f"agent on {node} exited (code {new.returncode}) after restart; last lines of "
                               f"{self.paths.agent_log(node)}:\n{log_tail(self.paths.agent_log(node))}")
            if time.monotonic() > deadline:
                raise LabError(f"agent on {node} not ready {timeout:.0f}s after restart")
            time.sleep(0.05)
        return new.pid
