"""Network-namespace primitives: create and delete namespaces, run commands and Python code inside one,
and find (and stop) the processes that live in one.

Only named namespaces under /run/netns are touched. Commands enter a namespace with
`nsenter --net=/run/netns/NAME`, never `ip netns exec`, because the latter remounts /sys and so hides the
root mount namespace's bpffs from the agent.
"""

from __future__ import annotations

import contextlib
import errno
import os
import pickle
import select
import signal
import subprocess
import time
import traceback
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

from bpflb_lab.lab.errors import LabError

NETNS_DIR = Path("/run/netns")

T = TypeVar("T")


def run(argv: Sequence[str], *, input: str | None = None, timeout: float = 30.0) -> str:
    """Run a command to completion; return its stdout, or raise LabError quoting the command and stderr."""
    try:
        proc = subprocess.run(list(argv), check=False, input=input, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError as exc:
        raise LabError(f"{argv[0]}: not found ({exc.strerror}); the lab needs iproute2 and util-linux") from exc
    except subprocess.TimeoutExpired as exc:
        raise LabError(f"`{' '.join(argv)}` did not finish within {timeout:.0f}s") from exc
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip()
        raise LabError(f"`{' '.join(argv)}` failed (exit {proc.returncode}): {detail}")
    return proc.stdout


def netns_path(name: str) -> Path:
    return NETNS_DIR / name


def nsenter_argv(ns: str, argv: Sequence[str]) -> list[str]:
    """The argv that runs argv inside namespace ns (nsenter execs it: the pid is the command's own)."""
    return ["nsenter", f"--net={netns_path(ns)}", "--", *argv]


def list_netns() -> list[str]:
    """Names of all named network namespaces (the files in /run/netns)."""
    try:
        return sorted(os.listdir(NETNS_DIR))
    except FileNotFoundError:
        return []


def netns_exists(name: str) -> bool:
    return netns_path(name).exists()


def netns_inode(name: str) -> int | None:
    """The inode identifying the namespace behind /run/netns/NAME, None when it does not exist."""
    try:
        return netns_path(name).stat().st_ino
    except OSError:
        return None


def add_netns(names: Iterable[str]) -> None:
    """Create named namespaces (one `ip` process for all of them) and bring their loopback up."""
    names = list(names)
    if not names:
        return
    run(["ip", "-batch", "-"], input="".join(f"netns add {n}\n" for n in names))
    for name in names:
        ip_batch(name, ["link set lo up"])


def delete_netns(names: Iterable[str]) -> list[str]:
    """Delete named namespaces, ignoring ones already gone; return the names that could not be removed."""
    names = [n for n in names if netns_path(n).exists()]
    if names:
        subprocess.run(["ip", "-force", "-batch", "-"], check=False, input="".join(f"netns del {n}\n" for n in names),
                       capture_output=True, text=True, timeout=30)
    stuck = []
    for name in names:
        path = netns_path(name)
        if path.exists():  # not a mount any more (e.g. after a reboot of the mount): just a stale file
            try:
                path.unlink()
            except OSError:
                stuck.append(name)
    return stuck


def ip_batch(ns: str, commands: Sequence[str]) -> None:
    """Run `ip` commands inside namespace ns, all in one `ip -n NS -batch -` process."""
    if not commands:
        return
    text = "".join(c + "\n" for c in commands)
    proc = subprocess.run(["ip", "-n", ns, "-batch", "-"], check=False, input=text, capture_output=True, text=True,
                          timeout=30)
    if proc.returncode != 0:
        failed = ""
        for line in proc.stderr.splitlines():  # "Command failed -:3"
            if line.startswith("Command failed -:"):
                try:
                    failed = f" at `ip {commands[int(line.rsplit(':', 1)[1]) - 1]}`"
                except (ValueError, IndexError):
                    pass
        raise LabError(f"ip in namespace {ns} failed{failed}: {proc.stderr.strip()}")


def setns(ns: str | int) -> None:
    """Move the calling thread into namespace ns, a name under /run/netns, a path or an open descriptor
    (Python 3.11 has no os.setns): pyroute2's setns(2) wrapper, told never to create a missing namespace.
    The one setns of bpflb."""
    from pyroute2 import netns as pr_netns

    target = ns if isinstance(ns, int) or ns.startswith("/") else str(netns_path(ns))
    try:
        pr_netns.setns(target, flags=0)
    except OSError as exc:
        raise OSError(exc.errno, f"setns({ns}): {os.strerror(exc.errno or 0)}") from exc


@contextlib.contextmanager
def entered(ns: str) -> Iterator[None]:
    """Run the body inside namespace ns (this thread only), then come back to where it was."""
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        setns(ns)
        try:
            yield
        finally:
            setns(home)
    finally:
        os.close(home)


def run_in_netns(ns: str, fn: Callable[..., T], *args: Any, timeout: float = 10.0, cgroup: Path | None = None) -> T:
    """Call fn(*args) in a forked child that has entered namespace ns (and cgroup, when given, before fn opens
    any socket); return its (pickled) result.

    Exceptions raised by fn come back as LabError carrying the child's traceback. The child is killed
    when it takes longer than timeout seconds.
    """
    if not netns_exists(ns):
        raise LabError(f"network namespace {ns} does not exist")
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never return into the caller's stack
        status = 0
        try:
            os.close(rfd)
            try:
                setns(ns)
                if cgroup is not None:
                    (cgroup / "cgroup.procs").write_text(str(os.getpid()))
                payload = pickle.dumps(("ok", fn(*args)))
            except BaseException as exc:  # noqa: BLE001 - everything must reach the parent
                payload = pickle.dumps(("err", f"{type(exc).__name__}: {exc}", traceback.format_exc()))
            view = memoryview(payload)
            while view:
                view = view[os.write(wfd, view):]
        except BaseException:  # noqa: BLE001
            status = 1
        finally:
            os._exit(status)
    os.close(wfd)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                os.kill(pid, signal.SIGKILL)
                raise LabError(f"{getattr(fn, '__name__', fn)} in namespace {ns} took longer than {timeout:.1f}s")
            # poll, not select: select() fails outright once a process holds over 1024 descriptors.
            poller = select.poll()
            poller.register(rfd, select.POLLIN | select.POLLHUP)
            if poller.poll(left * 1000):
                chunk = os.read(rfd, 1 << 16)
                if not chunk:
                    break
                chunks.append(chunk)
    finally:
        os.close(rfd)
        os.waitpid(pid, 0)
    if not chunks:
        raise LabError(f"{getattr(fn, '__name__', fn)} in namespace {ns}: the child died without a result")
    result = pickle.loads(b"".join(chunks))
    if result[0] == "err":
        raise LabError(f"in namespace {ns}: {result[1]}\n{result[2]}")
    value: T = result[1]
    return value


def write_sysctls(ns: str, values: dict[str, str]) -> None:
    """Set sysctls (dotted names) inside namespace ns; names ending in '?' are skipped when absent."""
    run_in_netns(ns, _write_sysctls, values)


def _write_sysctls(values: dict[str, str]) -> None:
    for key, value in values.items():
        optional = key.endswith("?")
        path = Path("/proc/sys") / key.rstrip("?").replace(".", "/")
        try:
            path.write_text(value)
        except FileNotFoundError:
            if not optional:
                raise


def pids_in_netns(inodes: Iterable[int]) -> dict[int, int]:
    """Processes whose network namespace is one of inodes: {pid: inode}. Skips this process."""
    wanted = set(inodes)
    found: dict[int, int] = {}
    if not wanted:
        return found
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            link = os.readlink(f"/proc/{entry}/ns/net")  # "net:[4026532281]"
        except OSError:
            continue  # gone, or a zombie / kernel thread without namespaces
        try:
            inode = int(link[link.index("[") + 1:-1])
        except ValueError:
            continue
        if inode in wanted:
            found[int(entry)] = inode
    return found


def _alive(pid: int) -> bool:
    """Running, not a zombie (zombies of our own children are left for their Popen to reap)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def kill_pids(pids: Iterable[int], grace: float = 1.0) -> list[int]:
    """SIGTERM the processes, SIGKILL the ones still alive after grace seconds; return those that survived."""
    pending = set(pids)
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 3.0)):
        for pid in list(pending):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pending.discard(pid)
            except OSError as exc:
                if exc.errno != errno.ESRCH:
                    raise
        deadline = time.monotonic() + wait
        while pending and time.monotonic() < deadline:
            pending = {p for p in pending if _alive(p)}
            if pending:
                time.sleep(0.02)
        if not pending:
            break
    return sorted(pending)
