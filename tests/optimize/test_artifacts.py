"""optimize.artifacts: atomic writes, manifests beside artifacts, refused outputs, stale temporaries, derived names."""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from optimize.artifacts import (Artifact, atomic_path, calibration_cache_path, check_not_input, engine_path,
                                last_checkpoint_path, manifest_path, prepare_output, read_manifest, recorded_data,
                                remove_stale_temp, resolve_data, sha256_file, write_error, write_json,
                                write_manifest)
from optimize.configs import FASHION_MNIST
from optimize.errors import DataError, OutputError


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_a_writer_that_raises_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "model.onnx"
    target.write_bytes(b"the complete old model")
    with pytest.raises(KeyError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half of a new mod")
            raise KeyError("the exporter failed half-way")
    assert target.read_bytes() == b"the complete old model"
    assert _leftovers(tmp_path) == []


def test_a_writer_that_raises_leaves_no_file_under_the_name(tmp_path):
    target = tmp_path / "sub" / "model.pth"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"partial")
            raise RuntimeError("killed")
    assert not target.exists() and _leftovers(target.parent) == []


def test_a_finished_write_is_renamed_into_place_with_a_normal_files_mode(tmp_path):
    target = tmp_path / "model.onnx"
    with atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and tmp.name != target.name and not target.exists()
        tmp.write_bytes(b"new")
    assert target.read_bytes() == b"new" and _leftovers(tmp_path) == []
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600


@dataclasses.dataclass
class _Cfg:
    out: Path
    amount: float


def test_manifest_round_trips_and_describes_the_artifact(tmp_path):
    artifact = tmp_path / "model.onnx"
    artifact.write_bytes(b"onnx bytes")
    written = write_manifest(artifact, stage="export", config=_Cfg(tmp_path / "x", 0.5),
                             inputs={"model": {"path": "t.pth"}}, preprocessing={"image_size": 8},
                             class_names=["a", "b"], metrics={"top1": np.float32(0.5), "shape": np.arange(3)},
                             extra={"engine": {"precision": "fp32"}})
    assert written == manifest_path(artifact) == tmp_path / "model.onnx.json"
    manifest = read_manifest(artifact)
    assert manifest == json.loads(written.read_text())
    assert manifest["sha256"] == sha256_file(artifact) == hashlib.sha256(b"onnx bytes").hexdigest()
    assert manifest["stage"] == "export" and manifest["artifact"] == "model.onnx"
    assert manifest["config"] == {"out": str(tmp_path / "x"), "amount": 0.5}  # a dataclass, its Path as text
    assert manifest["metrics"] == {"top1": 0.5, "shape": [0, 1, 2]}
    assert manifest["class_names"] == ["a", "b"] and manifest["engine"] == {"precision": "fp32"}
    assert "python" in manifest["versions"] and "numpy" in manifest["versions"]
    assert Artifact.of(artifact) == Artifact(artifact, manifest)


def test_no_manifest_and_a_damaged_one_read_as_none(tmp_path, caplog):
    artifact = tmp_path / "model.pth"
    assert read_manifest(artifact) is None and Artifact.of(artifact).manifest == {}
    manifest_path(artifact).write_text('{"stage": "tra')
    with caplog.at_level(logging.WARNING, logger="optimize.artifacts"):
        assert read_manifest(artifact) is None
    assert "ignoring unreadable manifest" in caplog.text


def test_write_json_refuses_what_json_cannot_hold_and_keeps_the_old_file(tmp_path):
    path = write_json(tmp_path / "r.json", {"a": 1})
    with pytest.raises(TypeError, match="cannot write object to JSON"):
        write_json(path, {"a": object()})
    assert json.loads(path.read_text()) == {"a": 1} and _leftovers(tmp_path) == []


def test_an_output_that_is_an_input_or_its_manifest_is_refused(tmp_path):
    model = tmp_path / "model.pth"
    model.write_bytes(b"weights")
    (tmp_path / "link.pth").symlink_to(model)
    os.link(model, tmp_path / "hard.pth")
    for out in (model, tmp_path / "link.pth", tmp_path / "hard.pth", tmp_path / "sub" / ".." / "model.pth"):
        with pytest.raises(OutputError, match=r"--out .* is the --model file .*destroy the input"):
            check_not_input(out, {"--model": model, "--teacher": None})
    with pytest.raises(OutputError, match="one is the other's manifest"):
        check_not_input(manifest_path(model), {"--model": model})
    with pytest.raises(OutputError, match="--engine"):
        check_not_input(model, {"--model": model}, flag="--engine")
    check_not_input(tmp_path / "pruned.pth", {"--model": model, "--teacher": None, "--data": ""})


@pytest.mark.parametrize("given, message", [("{folder}/", "names a folder"), ("{folder}", "is a directory")])
def test_an_output_naming_a_folder_is_refused_before_work_starts(tmp_path, given, message):
    with pytest.raises(OutputError, match=message):
        prepare_output(given.format(folder=tmp_path))


def test_prepare_output_creates_the_folder_and_leaves_no_probe(tmp_path):
    out = prepare_output(tmp_path / "a" / "b" / "model.onnx")
    assert out.parent.is_dir() and not out.exists() and list(out.parent.iterdir()) == []


def _dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(proc.stdout)


def test_stale_temporaries_go_and_live_ones_stay(tmp_path, caplog):
    """A dead writer's file goes at once, an hour-old one goes, a fresh or live one and other files stay."""
    folder = tmp_path
    dead = folder / f".model.onnx.p{_dead_pid()}.abcd1234.tmp"
    live = folder / f".model.onnx.p{os.getpid()}.abcd1234.tmp"
    fresh = folder / ".model.pth.abcd1234.tmp"
    old = folder / ".model.pth.zzzz9999.probe"
    old_package = folder / ".bundle.4242.old"
    for path in (dead, live, fresh, old):
        path.write_bytes(b"x")
    (old_package / "inner").mkdir(parents=True)
    (old_package / "inner" / "f").write_bytes(b"x")
    ours = {".hidden", ".model.onnx.tmp", "model.onnx"}  # not our pattern: a user's files are never touched
    for name in ours:
        (folder / name).write_bytes(b"keep")
    hour_ago = time.time() - 3700
    for path in (old, old_package, old_package / "inner", old_package / "inner" / "f", folder / ".hidden"):
        os.utime(path, (hour_ago, hour_ago))
    with caplog.at_level(logging.WARNING, logger="optimize.artifacts"):
        removed = remove_stale_temp(folder)
    assert sorted(removed) == sorted([dead, old, old_package])
    assert {p.name for p in folder.iterdir()} == ours | {live.name, fresh.name}
    assert caplog.text.count("left by an interrupted run") == 3


def test_a_folder_with_a_recent_change_inside_is_not_stale(tmp_path):
    work = tmp_path / ".bundle.abcd1234.tmp"
    (work / "deep").mkdir(parents=True)
    (work / "deep" / "weights.bin").write_bytes(b"being written")
    hour_ago = time.time() - 3700
    for path in (work, work / "deep"):
        os.utime(path, (hour_ago, hour_ago))
    assert remove_stale_temp(tmp_path) == [] and work.is_dir()


def test_a_missing_folder_has_nothing_stale(tmp_path):
    assert remove_stale_temp(tmp_path / "absent") == []


@pytest.mark.parametrize("error, expected", [
    (OSError(errno.ENOSPC, "No space left on device"), "No space left on device; free space or choose another --out"),
    (OSError(errno.EDQUOT, "Disk quota exceeded"), "Disk quota exceeded; free space"),
    (OSError(errno.EROFS, "Read-only file system"), "Read-only file system; choose another --out in a writable"),
    (PermissionError(errno.EACCES, "Permission denied"), "Permission denied; choose another --out in a writable"),
    (RuntimeError("PytorchStreamWriter failed writing file data/0"), "the write failed (PytorchStreamWriter"),
    (OSError(errno.ENOENT, "No such file"), None),
    (RuntimeError("shape mismatch"), None),
    (ValueError("anything else"), None),
])
def test_write_errors_are_told_apart_from_other_failures(tmp_path, error, expected):
    found = write_error(tmp_path / "model.pth", error)
    if expected is None:
        assert found is None
    else:
        assert isinstance(found, OutputError) and str(found).startswith(f"cannot write {tmp_path / 'model.pth'}: ")
        assert expected in str(found)


def test_a_failed_write_inside_atomic_path_is_an_output_error_naming_the_file(tmp_path):
    target = tmp_path / "model.pth"
    with pytest.raises(OutputError, match=r"model\.pth: No space left on device") as info:
        with atomic_path(target):
            raise OSError(errno.ENOSPC, "No space left on device")
    assert isinstance(info.value.__cause__, OSError) and _leftovers(tmp_path) == [] and not target.exists()


def test_derived_artifact_names():
    assert calibration_cache_path("runs/model.int8.onnx") == Path("runs/model.int8.calib.json")
    assert calibration_cache_path("runs/model.int8.engine") == Path("runs/model.int8.calib.json")
    assert last_checkpoint_path("runs/teacher.pth") == Path("runs/teacher.last.pth")
    assert last_checkpoint_path("runs/teacher") == Path("runs/teacher.last.pth")
    assert engine_path("runs", "tensorrt", "int8") == Path("runs/model.int8.engine")
    assert engine_path("runs", "onnxruntime", "fp32") == Path("runs/model.ort.onnx")
    assert engine_path("runs", "openvino", "int8") == Path("runs/model.int8.ov.xml")


def _artifact(path: Path, manifest: dict | None) -> Path:
    path.write_bytes(b"x")
    if manifest is not None:
        write_json(manifest_path(path), manifest)
    return path


def test_the_recorded_data_is_found_back_through_the_inputs(tmp_path):
    """engine -> INT8 ONNX -> ONNX (export records no data here) -> student, whose training data wins."""
    folder = tmp_path / "images"
    folder.mkdir()
    student = _artifact(tmp_path / "student.pth", {"stage": "distill", "inputs": {"data": {"data": str(folder)}}})
    onnx = _artifact(tmp_path / "model.onnx", {"stage": "export", "config": {"data": None},
                                               "inputs": {"model": {"path": str(student)}}})
    int8 = _artifact(tmp_path / "model.int8.onnx", {"stage": "calibrate", "inputs": {"onnx": {"path": str(onnx)}}})
    engine = _artifact(tmp_path / "model.int8.engine", {"stage": "build-engine",
                                                        "inputs": {"onnx": {"path": str(int8)}}})
    assert recorded_data(engine) == (str(folder), manifest_path(student))
    assert resolve_data(None, engine) == str(folder)
    assert resolve_data("fashion-mnist", engine) == "fashion-mnist"  # given wins


def test_a_manifest_loop_ends_and_nothing_recorded_gives_the_default(tmp_path, caplog):
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    _artifact(a, {"stage": "export", "config": {}, "inputs": {"model": {"path": str(b)}}})
    _artifact(b, {"stage": "export", "config": {}, "inputs": {"model": {"path": str(a)}}})
    assert recorded_data(a) is None
    with caplog.at_level(logging.INFO, logger="optimize.artifacts"):
        assert resolve_data(None, a) == FASHION_MNIST
    assert "records no data set: using fashion-mnist (--data overrides)" in caplog.text
    assert resolve_data(None, a, default=None) is None


def test_recorded_data_folder_that_is_gone_names_the_manifest_and_flag(tmp_path):
    model = _artifact(tmp_path / "model.onnx", {"stage": "export", "config": {"data": str(tmp_path / "gone")}})
    with pytest.raises(DataError, match=r"model\.onnx\.json records the data folder .*gone.*give --calib-data"):
        resolve_data(None, model, flag="--calib-data")
