"""The lock that keeps two processes from writing one folder, and the process record it holds.

A lock is a file made with ``O_EXCL`` that records its holder's pid, start time and host. A pid alone is not
enough (pids are recycled), so a holder counts as alive only while a process with the same pid *and* the same
start time runs. ``pipeline`` holds one on its output folder; ``search`` holds one while a process measures the
baseline or distils the shared student, and records the same process record on each trial it runs, so that a
later process can tell a killed trial from a running one.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

from .errors import ConfigError

logger = logging.getLogger(__name__)

LOCK_FILE = ".pipeline.lock"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _process_start(pid: int) -> int | None:
    """When process ``pid`` started (clock ticks since boot, ``/proc/PID/stat`` field 22); None where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (OSError, ValueError):
        return None
    fields = stat.rpartition(")")[2].split()  # after the command name, which may hold spaces and ')'
    try:
        return int(fields[19])  # field 22 counts from 1 and the name is field 2: index 22 - 3
    except (IndexError, ValueError):
        return None


def process_record() -> dict[str, Any]:
    """This process as a lock or a search trial records it: pid, start time and host."""
    return {"pid": os.getpid(), "start": _process_start(os.getpid()), "host": socket.gethostname()}


def process_running(record: dict[str, Any]) -> bool:
    """Whether the process a :func:`process_record` describes still runs: same pid *and* same start time.

    A pid alone is not enough: pids are recycled, and a lock naming pid 1 (or any unrelated process) would block
    forever. A record of another host cannot be checked from here and counts as running.
    """
    pid = record.get("pid")
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0 or pid == os.getpid():
        return False
    if record.get("host") not in (None, socket.gethostname()):
        return True
    if not _pid_alive(pid):
        return False
    start = _process_start(pid)
    if start is None:  # no /proc (not Linux): the pid is all there is to go by
        return True
    if record.get("start") is not None:
        return record["start"] == start
    try:  # a bare pid (an older edgeopt's lock): running only if that process is a pipeline
        return b"pipeline" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def _age(path: Path) -> float:
    try:
        return time.time() - path.stat().st_mtime
    except OSError:
        return 0.0


def _read_lock(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8", errors="replace").strip()
    except OSError:
        return {}
    try:
        record = json.loads(text or "{}")
    except json.JSONDecodeError:
        return {}
    return record if isinstance(record, dict) else {"pid": record} if isinstance(record, int) else {}


@contextlib.contextmanager
def locked(out: Path, *, wait: bool = False):
    """Hold ``<out>/.pipeline.lock`` so two pipelines never write one folder; a lock whose holder is gone is taken.

    The lock records this process's pid, start time and host, so a recycled pid does not pass for its holder.
    ``wait``: while another live process holds it, wait for it instead of refusing (``search`` processes sharing
    one folder take turns making what they share).
    """
    path = out / LOCK_FILE
    out.mkdir(parents=True, exist_ok=True)
    stale_taken = 0
    while True:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            break
        except FileExistsError:
            record = _read_lock(path)
            if not record and _age(path) < 5.0:  # created, its record not written yet
                time.sleep(0.2)
                continue
            if process_running(record):
                if wait:
                    time.sleep(1.0)
                    continue
                where = f" on {record['host']}" if record.get("host") not in (None, socket.gethostname()) else ""
                raise ConfigError(f"another pipeline (pid {record['pid']}{where}) is running in {out}; wait for it, "
                                  f"stop it, or give another --out (if none is running, delete {path})") from None
            stale_taken += 1
            if stale_taken > 2:  # pragma: no cover - lost a race twice
                raise ConfigError(f"cannot take the lock {path}; is another pipeline starting in {out}?") from None
            logger.warning("removing the stale lock %s (pid %s is gone or is not a pipeline)", path,
                           record.get("pid", "unknown"))
            path.unlink(missing_ok=True)
    os.write(fd, json.dumps(process_record()).encode())
    os.close(fd)
    try:
        yield
    finally:
        path.unlink(missing_ok=True)
