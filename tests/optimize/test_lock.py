"""The lock on an output folder (optimize/lock.py): one holder at a time, a dead or unrelated holder's lock taken
over. Other holders are real processes: a child that takes the lock and holds it until it is stopped or killed."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT
from optimize import lock
from optimize.errors import ConfigError

# a process that takes the lock on the folder it is given, says so, and holds it until it ends
HOLDER = ("import sys, time; from pathlib import Path; from optimize import lock\n"
          "with lock.locked(Path(sys.argv[1])):\n"
          "    print('held', flush=True)\n"
          "    time.sleep(float(sys.argv[2]))\n")


def _holder(out: Path, seconds: float = 120.0) -> subprocess.Popen:
    """A child process holding ``out``'s lock (started from the repository, so it runs this checkout's code)."""
    child = subprocess.Popen([sys.executable, "-c", HOLDER, str(out), str(seconds)], cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = child.stdout.readline()
    assert line.strip() == "held", child.communicate()
    return child


@pytest.mark.parametrize("content", ["1", json.dumps({"pid": 1, "start": 1, "host": os.uname().nodename})])
def test_lock_of_another_process_is_stale(tmp_path, content):
    out = tmp_path / "runs"
    out.mkdir()
    (out / lock.LOCK_FILE).write_text(content)
    with lock.locked(out):
        held = json.loads((out / lock.LOCK_FILE).read_text())
        assert held["pid"] == os.getpid()
    assert not (out / lock.LOCK_FILE).exists()


def test_lock_of_a_live_pipeline_is_respected(tmp_path):
    out = tmp_path / "runs"
    out.mkdir()
    with lock.locked(out):
        child = subprocess.run([sys.executable, "-c", (
            "import sys; from pathlib import Path; from optimize import lock\n"
            f"with lock.locked(Path({str(out)!r})): pass")], cwd=ROOT, capture_output=True, text=True)
        assert child.returncode != 0 and "ConfigError: another pipeline" in child.stderr, child.stderr


def test_a_second_holder_is_refused_with_a_message_naming_the_holder(tmp_path):
    out = tmp_path / "runs"
    child = _holder(out)
    try:
        with pytest.raises(ConfigError) as refused:
            with lock.locked(out):
                pytest.fail("took a lock a live process holds")
        message = str(refused.value)
        assert f"another pipeline (pid {child.pid}) is running in {out}" in message
        assert f"delete {out / lock.LOCK_FILE}" in message  # the way out, should the holder be gone after all
        assert json.loads((out / lock.LOCK_FILE).read_text())["pid"] == child.pid  # the holder's lock is untouched
    finally:
        child.kill()
        child.communicate()


def test_a_dead_holders_lock_is_taken_over(tmp_path, caplog):
    out = tmp_path / "runs"
    child = _holder(out)
    child.send_signal(signal.SIGKILL)  # no clean-up: its lock file stays, naming a process that is gone
    child.communicate()
    assert json.loads((out / lock.LOCK_FILE).read_text())["pid"] == child.pid
    with caplog.at_level(logging.WARNING, logger="optimize.lock"), lock.locked(out):
        assert json.loads((out / lock.LOCK_FILE).read_text()) == lock.process_record()
    assert f"removing the stale lock {out / lock.LOCK_FILE} (pid {child.pid} is gone" in caplog.text
    assert not (out / lock.LOCK_FILE).exists()


def test_waiting_takes_the_lock_once_its_holder_ends(tmp_path):
    out = tmp_path / "runs"
    child = _holder(out, seconds=1.0)
    try:
        with lock.locked(out, wait=True):  # search's processes take turns instead of refusing
            assert json.loads((out / lock.LOCK_FILE).read_text())["pid"] == os.getpid()
            assert child.wait(timeout=30) == 0  # it let go of the lock and ended as it should
    finally:
        child.kill()
        child.communicate()


def test_a_holder_on_another_host_counts_as_running():
    """Its pid means nothing here: only that host could tell, so the lock holds (the message names the host)."""
    assert lock.process_running({"pid": 1, "start": 1, "host": "elsewhere.invalid"})
    assert not lock.process_running(lock.process_record())  # this very process is never another holder
    assert not lock.process_running({"pid": "1"}) and not lock.process_running({})


def test_a_lock_naming_another_host_is_refused_with_the_host(tmp_path):
    out = tmp_path / "runs"
    out.mkdir()
    (out / lock.LOCK_FILE).write_text(json.dumps({"pid": 4242, "start": 7, "host": "elsewhere.invalid"}))
    with pytest.raises(ConfigError, match=r"another pipeline \(pid 4242 on elsewhere.invalid\)"):
        with lock.locked(out):
            pass
