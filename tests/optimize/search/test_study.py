"""The study (optimize/search/study.py) through ``cli.py search``: resumed after a kill without redoing trials, shared
by two processes on SQLite and by two workers on a real PostgreSQL, the setup checked before it opens.

Each trial is a pipeline run measured on the CPU, with the tiny options of search_cli.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, error_line, run_main, skip_locally_fail_in_ci
from search_cli import search_args

try:
    import optuna
except ImportError:
    skip_locally_fail_in_ci("optuna is a dependency of edgeopt: pip install -e .", module=True)


def start(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "EDGEOPT_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, str(ROOT / "cli.py"), "-q", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def load(out: Path):
    return optuna.load_study(study_name="edgeopt-search", storage=f"sqlite:///{out / 'study.db'}")


def finished(study) -> list:
    return [t for t in study.get_trials() if t.state.name in ("COMPLETE", "PRUNED")]


def trial_lines(stdout: str) -> list[str]:
    return [ln for ln in stdout.splitlines() if ln.startswith("trial ")]


def test_killed_search_resumes_without_redoing_trials_and_best_yaml_is_a_pipeline_recipe(trained, tmp_path):
    out = tmp_path / "search"
    proc = start(search_args(trained, out, 3))
    marker = out / "trials" / "trial-0001" / "pipeline.json"
    deadline = time.time() + 300
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, f"search ended before trial 1 started:\n{proc.communicate()}"
    proc.send_signal(signal.SIGKILL)  # no chance to clean up: the trial stays RUNNING in the storage
    proc.wait()
    study = load(out)
    states = {t.number: t.state.name for t in study.get_trials()}
    assert states[0] == "COMPLETE" and states[1] == "RUNNING", states
    first = (out / "trials" / "trial-0000" / "pipeline.json").stat().st_mtime_ns

    again = run_main("-q", *search_args(trained, out, 3))  # without --resume an existing study is refused
    assert again.returncode == 2 and "--resume" in error_line(again)

    resumed = run_main("-q", *search_args(trained, out, 3), "--resume")  # in this process: no second start-up
    assert resumed.returncode == 0, resumed.stderr
    lines = trial_lines(resumed.stdout)
    assert len(lines) == 2, resumed.stdout  # trial 0 is not redone: the retry of 1 and one more
    study = load(out)
    trials = study.get_trials()
    assert len(finished(study)) == 3
    assert trials[1].state.name == "FAIL" and "killed" in trials[1].user_attrs["error"]
    retry = next(t for t in trials if t.user_attrs.get("retry_of") == 1)
    assert retry.params == trials[1].params and retry.state.name in ("COMPLETE", "PRUNED")
    assert (out / "trials" / "trial-0000" / "pipeline.json").stat().st_mtime_ns == first
    assert trials[0].user_attrs.get("starting_point") == "quick"  # the preset's own recipe went first

    report = json.loads((out / "search.json").read_text())
    assert [t["number"] for t in report["trials"]] == [t.number for t in trials]
    chosen = report["chosen"]
    assert chosen["within"] and chosen["number"] in [t.number for t in finished(study)]
    md = (out / "report.md").read_text()
    assert "## Chosen" in md and "## Pareto front" in md and "retry of 1" in md
    assert (out / "pareto.png").stat().st_size > 1000

    study.enqueue_trial(trials[0].params)  # a point already measured comes back (TPE does that): not rerun
    twin = run_main("-q", *search_args(trained, out, 4), "--resume")
    assert twin.returncode == 0 and "same parameters as trial 0" in twin.stdout, twin.stderr
    last = load(out).get_trials()[-1]
    assert last.values == trials[0].values and last.user_attrs["duplicate_of"] == 0
    assert not (out / "trials" / f"trial-{last.number:04d}").exists()

    best = out / "best.yaml"
    recipe = yaml.safe_load(best.read_text())
    assert recipe["teacher"] == str(trained.resolve()) and recipe["stages"]["benchmark"]["batch_sizes"] == [8]
    assert recipe == trials[chosen["number"]].user_attrs["recipe"]
    plan = run_main("pipeline", "--preset", "quick", "--config", best, "--out", tmp_path / "best", "--dry-run")
    assert plan.returncode == 0, plan.stderr
    assert "export" in plan.stdout and "benchmark" in plan.stdout and "teacher" not in plan.stdout.split("#")[-1]


def test_two_processes_sharing_one_sqlite_study_finish_n_trials_in_all(trained, tmp_path):
    out = tmp_path / "shared"
    args = search_args(trained, out, 3, "--resume")
    first = start(args)
    time.sleep(1.0)  # let the first create the study's tables; the second joins it
    second = start(args)
    outputs = [p.communicate(timeout=600) for p in (first, second)]
    for p, (stdout, stderr) in zip((first, second), outputs):
        assert p.returncode == 0, stderr
    lines = [ln for stdout, _ in outputs for ln in trial_lines(stdout)]
    study = load(out)
    done = finished(study)
    assert len(done) == 3 and len(lines) == 3, (lines, [(t.number, t.state.name) for t in study.get_trials()])
    ran = sorted(int(ln.split()[1]) for ln in lines)
    assert ran == sorted(t.number for t in done)  # each finished trial ran once, in one process
    workers = {t.user_attrs["worker"]["pid"] for t in done}
    assert len(workers) == 2, "both processes should have run trials"
    for t in study.get_trials():
        assert t.state.name in ("COMPLETE", "PRUNED") or t.user_attrs.get("surplus"), (t.number, t.state.name)


def test_bad_search_options_are_one_line_errors_and_write_nothing(trained, image_folder, tmp_path):
    out = tmp_path / "nothing"
    for extra, words in ((["--max-accuracy-drop", "-1"], "--max-accuracy-drop"), (["--trials", "0"], "--trials"),
                         (["--student", tmp_path / "absent.pth"], "--student"),
                         (["--storage", "sqlite:////nonexistent/dir/study.db"], "--storage")):
        proc = run_main("search", "--teacher", trained, "--out", out, *extra)
        assert proc.returncode == 2 and words in error_line(proc), proc.stderr
        assert not out.exists()
    proc = run_main("search", "--teacher", trained, "--data", image_folder, "--out", out)  # 10 classes vs 3
    assert proc.returncode == 2 and "class" in error_line(proc)
    assert not out.exists()


# -- a fleet's shared study on a real PostgreSQL -------------------------------------------------------------

def _postgres_binary(name: str) -> str | None:
    import glob
    import shutil

    return shutil.which(name) or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)), None)


@pytest.fixture
def postgres_url():
    """A throw-away PostgreSQL cluster (initdb + pg_ctl in a temp folder, as an unprivileged user, on a Unix socket
    only); yields its SQLAlchemy URL and stops it."""
    import pwd
    import shutil
    import socket
    import tempfile

    initdb, pg_ctl = _postgres_binary("initdb"), _postgres_binary("pg_ctl")
    if not (initdb and pg_ctl):
        skip_locally_fail_in_ci("PostgreSQL's initdb / pg_ctl are not here: apt-get install postgresql (.ci/run "
                                "installs it)")
    try:
        import psycopg2  # noqa: F401 - the driver the URL names
    except ImportError:
        skip_locally_fail_in_ci("psycopg2 is not installed: pip install -e '.[test]'")
    root = Path(tempfile.mkdtemp(prefix="edgeopt-pg-", dir="/tmp"))  # short: a socket path has ~100 bytes
    demote = None
    if os.geteuid() == 0:  # initdb refuses to run as root: the cluster belongs to nobody
        user = pwd.getpwnam("nobody")
        os.chown(root, user.pw_uid, user.pw_gid)

        def demote():
            os.setgid(user.pw_gid)
            os.setuid(user.pw_uid)

    def pg(*args) -> subprocess.CompletedProcess:
        return subprocess.run([str(a) for a in args], preexec_fn=demote, cwd=root, capture_output=True, text=True,
                              timeout=120)

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    data = root / "data"
    made = pg(initdb, "-D", data, "-U", "edgeopt", "--auth=trust", "-E", "UTF8", "--no-sync")
    assert made.returncode == 0, made.stdout + made.stderr
    started = pg(pg_ctl, "-D", data, "-l", root / "server.log", "-w", "-t", "60", "-o",
                 f"-k {root} -p {port} -c listen_addresses='' -c fsync=off", "start")
    assert started.returncode == 0, started.stdout + started.stderr + (root / "server.log").read_text()
    try:
        yield f"postgresql+psycopg2://edgeopt@/postgres?host={root}&port={port}"
    finally:
        pg(pg_ctl, "-D", data, "-m", "immediate", "stop")
        shutil.rmtree(root, ignore_errors=True)


def test_two_workers_on_postgresql_one_killed_mid_trial(trained, tmp_path, postgres_url):
    out = tmp_path / "fleet"
    args = search_args(trained, out, 3, "--resume", "--storage", postgres_url)
    first = start(args)
    time.sleep(1.0)  # let the first create the study's tables; the second joins it
    second = start(args)
    storage = optuna.storages.RDBStorage(postgres_url)
    killed, deadline = None, time.time() + 300
    while killed is None and first.poll() is None and time.time() < deadline:
        try:
            trials = optuna.load_study(study_name="edgeopt-search", storage=storage).get_trials()
        except KeyError:  # the study is not created yet
            trials = []
        for t in trials:
            worker = t.user_attrs.get("worker") or {}
            if (t.state.name == "RUNNING" and worker.get("pid") == first.pid
                    and (out / "trials" / f"trial-{t.number:04d}" / "pipeline.json").exists()):
                killed = t.number  # the first worker is inside this trial's pipeline
        time.sleep(0.1)
    assert killed is not None, f"the first worker ran no trial:\n{first.communicate()}"
    first.send_signal(signal.SIGKILL)  # no clean-up: its trial stays RUNNING in the database
    first.wait()
    stdout, stderr = second.communicate(timeout=600)
    assert second.returncode == 0, stderr

    study = optuna.load_study(study_name="edgeopt-search", storage=storage)
    trials = study.get_trials()
    assert trials[killed].state.name == "FAIL" and "killed" in trials[killed].user_attrs["error"]
    retries = [t for t in trials if t.user_attrs.get("retry_of") == killed]
    assert len(retries) == 1 and retries[0].params == trials[killed].params  # re-queued once
    assert retries[0].state.name in ("COMPLETE", "PRUNED")
    done = finished(study)
    assert len(done) == 3, [(t.number, t.state.name) for t in trials]
    for t in done:
        if t.state.name == "COMPLETE" and "duplicate_of" not in t.user_attrs:
            folder = out / "trials" / f"trial-{t.number:04d}"
            assert (folder / "pipeline.json").is_file() and (folder / "report" / "report.json").is_file(), t.number
    report = json.loads((out / "search.json").read_text())
    numbers = [t["number"] for t in report["trials"]]
    assert sorted(numbers) == sorted(set(numbers)) == [t.number for t in trials]  # each trial once
    states = [t["state"] for t in report["trials"]]
    assert states.count("COMPLETE") + states.count("PRUNED") == 3 and states.count("FAIL") == 1
    assert report["storage"].startswith("postgresql")
