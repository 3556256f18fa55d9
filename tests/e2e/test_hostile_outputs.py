"""Hostile output paths: --out equal to an input, a full or read-only disk, package --force on folders it did not
write, truncated inputs, an opset the exporter cannot write, and temp files a killed run left behind.

Every case runs the real CLI and expects one ``error: ...`` line (exit 2) that names the file, inputs untouched
and no temporary file left.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from conftest import TINY, error_line, run_cli, run_main

FAST = ["--train-limit", "64", "--val-limit", "32", "--batch-size", "32", "--epochs", "1"]
HOURS_AGO = time.time() - 3 * 3600


def _copy_with_manifest(src: Path, dst: Path) -> Path:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)
    shutil.copyfile(src.with_name(src.name + ".json"), dst.with_name(dst.name + ".json"))
    return dst


def _snapshot(*paths: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in paths}


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def _mount_tmpfs(path: Path, options: str) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {proc.stderr.strip()}")
    return path


@pytest.fixture
def full_disk(tmp_path):
    """A 2 MB file system: far too small for any model."""
    path = _mount_tmpfs(tmp_path / "full", "size=2m")
    yield path
    subprocess.run(["umount", str(path)], check=False)


@pytest.fixture
def read_only(tmp_path):
    path = _mount_tmpfs(tmp_path / "ro", "ro,size=1m")
    yield path
    subprocess.run(["umount", str(path)], check=False)


@pytest.fixture
def model_copy(trained, tmp_path) -> Path:
    return _copy_with_manifest(trained, tmp_path / "in" / "teacher.pth")


@pytest.fixture
def onnx_copy(exported_onnx, tmp_path) -> Path:
    return _copy_with_manifest(exported_onnx, tmp_path / "in" / "model.onnx")


# 1. --out resolving to an input -----------------------------------------------------------------------------------

@pytest.mark.parametrize("stage, flag, extra", [
    ("export", "--model", []),
    ("prune", "--model", ["--amount", "0.3", *FAST[:6]]),
    ("distill", "--teacher", ["--image-size", "16", *FAST]),
])
def test_out_equal_to_a_checkpoint_input_is_refused(model_copy, stage, flag, extra):
    before = _snapshot(model_copy, model_copy.with_name("teacher.pth.json"))
    proc = run_main(stage, flag, model_copy, "--out", model_copy, *extra)
    line = error_line(proc)
    assert proc.returncode == 2 and str(model_copy) in line and flag in line and "--out" in line, line
    assert _snapshot(*before) == before


def test_distill_out_equal_to_student_init_is_refused(model_copy, trained):
    proc = run_main("distill", "--teacher", trained, "--student-init", model_copy, "--out", model_copy, *FAST)
    assert proc.returncode == 2 and "--student-init" in error_line(proc)


def test_out_through_a_symlink_or_onto_the_inputs_manifest_is_refused(model_copy, tmp_path):
    link = tmp_path / "link.pth"
    link.symlink_to(model_copy)
    manifest = model_copy.with_name("teacher.pth.json")
    before = _snapshot(model_copy, manifest)
    for out in (link, manifest, tmp_path / "in" / ".." / "in" / "teacher.pth"):
        proc = run_main("export", "--model", model_copy, "--out", out)
        assert proc.returncode == 2 and "choose another --out" in error_line(proc)
    assert _snapshot(*before) == before


@pytest.mark.parametrize("stage, extra", [
    ("calibrate", ["--num-images", "32", "--val-limit", "32"]),
    ("build-engine", []),
])
def test_out_equal_to_the_onnx_input_is_refused(onnx_copy, stage, extra):
    before = _snapshot(onnx_copy, onnx_copy.with_name("model.onnx.json"))
    proc = run_main(stage, "--onnx", onnx_copy, "--out", onnx_copy, *extra)
    line = error_line(proc)
    assert proc.returncode == 2 and str(onnx_copy) in line and "--onnx" in line, line
    assert _snapshot(*before) == before


# 2. full and read-only disks --------------------------------------------------------------------------------------

def _assert_disk_full(proc, folder: Path):
    line = error_line(proc)
    assert proc.returncode == 2 and str(folder) in line and "free space" in line, line
    assert list(folder.iterdir()) == [] or _leftovers(folder) == [], sorted(p.name for p in folder.iterdir())


@pytest.mark.parametrize("stage, out_name, args", [
    ("train", "t.pth", lambda request: [*TINY[:4], *FAST]),
    ("export", "m.onnx", lambda request: ["--model", request.getfixturevalue("trained")]),
    ("calibrate", "m.int8.onnx", lambda request: ["--onnx", request.getfixturevalue("exported_onnx"),
                                                  "--num-images", "32", "--val-limit", "32"]),
    ("package", "bundle", lambda request: ["--model", request.getfixturevalue("exported_onnx")]),
])
def test_a_stage_on_a_full_disk(full_disk, request, stage, out_name, args):
    proc = run_cli("-q", stage, *args(request), "--out", full_disk / out_name)
    _assert_disk_full(proc, full_disk)
    assert not (full_disk / out_name).exists()


def test_package_into_a_read_only_folder(exported_onnx, read_only):
    proc = run_cli("-q", "package", "--model", exported_onnx, "--out", read_only / "bundle")
    line = error_line(proc)
    assert proc.returncode == 2 and str(read_only) in line, line


# 3. package --force on folders it did not write -------------------------------------------------------------------

def test_package_force_into_the_models_own_folder_is_refused(onnx_copy, tmp_path):
    keep = onnx_copy.with_name("notes.txt")
    keep.write_text("mine")
    for out in (onnx_copy.parent, tmp_path):  # the model's folder, and an ancestor of it
        proc = run_main("-q", "package", "--model", onnx_copy, "--out", out, "--force")
        line = error_line(proc)
        assert proc.returncode == 2 and str(onnx_copy) in line, line
    assert keep.read_text() == "mine" and onnx_copy.is_file()


def test_package_force_onto_dot_dot_is_refused_unless_it_is_a_bundle(exported_onnx, tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "notes.txt").write_text("mine")
    proc = run_main("-q", "package", "--model", exported_onnx, "--out", f"{tmp_path}/x/..", "--force")
    line = error_line(proc)
    assert proc.returncode == 2 and "bundle" in line, line
    assert (tmp_path / "notes.txt").read_text() == "mine" and (tmp_path / "x").is_dir()
    # a bundle package wrote may be replaced however it is spelled
    bundle = tmp_path / "bundle"
    run_cli("-q", "package", "--model", exported_onnx, "--out", bundle, check=True)
    (bundle / "sub").mkdir()
    run_cli("-q", "package", "--model", exported_onnx, "--out", bundle / "sub" / "..", "--force", check=True)
    assert (bundle / "bundle.json").is_file() and not (bundle / "sub").exists()
    assert _leftovers(tmp_path) == []


# 4. truncated inputs ----------------------------------------------------------------------------------------------

def test_package_a_truncated_onnx(exported_onnx, tmp_path):
    truncated = tmp_path / "cut.onnx"
    data = exported_onnx.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    proc = run_main("-q", "package", "--model", truncated, "--out", tmp_path / "bundle")
    line = error_line(proc)
    assert proc.returncode == 2 and str(truncated) in line, line
    assert not (tmp_path / "bundle").exists() and _leftovers(tmp_path) == []


# 5. opsets the exporter cannot write ------------------------------------------------------------------------------

@pytest.mark.parametrize("opset", ["99", "5", "0"])
def test_export_opset_out_of_range(trained, tmp_path, opset):
    proc = run_main("export", "--model", trained, "--out", tmp_path / "m.onnx", "--opset", opset)
    line = error_line(proc)
    assert proc.returncode == 2 and f"--opset {opset}" in line and "7" in line, line
    assert proc.stdout == "" and not (tmp_path / "m.onnx").exists()


def test_exporter_failure_dumps_nothing_on_stdout(trained, tmp_path, monkeypatch):
    """A failing torch.onnx.export prints its whole graph from C++; the user gets one line."""
    from optimize import export

    def failing(*args, **kwargs):
        os.write(1, b"Torch IR graph at exception: graph(...)\n")
        raise RuntimeError("Unsupported onnx_opset_version: 99")

    monkeypatch.setattr(export.torch.onnx, "export", failing)
    out = tmp_path / "m.onnx"
    captured = tmp_path / "stdout"
    with open(captured, "w+") as fh:
        saved = os.dup(1)
        os.dup2(fh.fileno(), 1)
        try:
            with pytest.raises(export.ExportError, match="torch.onnx.export"):
                export.run(export.ExportConfig(model=str(trained), out=str(out)))
        finally:
            os.dup2(saved, 1)
            os.close(saved)
    assert captured.read_text() == "" and not out.exists() and _leftovers(tmp_path) == []


# 6. temporary files a killed run left -----------------------------------------------------------------------------

def _age(path: Path) -> Path:
    for p in [path, *path.rglob("*")] if path.is_dir() else [path]:
        os.utime(p, (HOURS_AGO, HOURS_AGO))
    return path


def test_stale_temp_files_are_removed_on_the_next_run(trained, tmp_path):
    out = tmp_path / "runs"
    out.mkdir()
    stale = out / ".model.onnx.a1b2c3d4.tmp"
    stale.write_bytes(b"half a model")
    _age(stale)
    fresh = out / ".model.onnx.e5f6g7h8.tmp"  # maybe another run writing right now: kept
    fresh.write_bytes(b"being written")
    mine = out / ".notes.tmp"  # not our naming pattern: kept
    mine.write_text("user file")
    _age(mine)
    system_tmp = tmp_path / "systmp"
    calib = system_tmp / "edgeopt-calib-k2j4h5g6"
    calib.mkdir(parents=True)
    (calib / "prepared.onnx").write_bytes(b"x")
    _age(calib)
    other = system_tmp / "someone-else-abcdefgh"
    other.mkdir()
    _age(other)

    proc = run_cli("export", "--model", trained, "--out", out / "model.onnx", env={"TMPDIR": str(system_tmp)},
                   check=True)
    assert not stale.exists() and not calib.exists()
    assert fresh.exists() and mine.exists() and other.exists()
    warnings = [ln for ln in proc.stderr.splitlines() if ln.startswith("removed stale")]
    assert len(warnings) == 2 and any(str(stale) in w for w in warnings), proc.stderr


def test_stale_half_written_bundle_is_removed_by_package(exported_onnx, tmp_path):
    half = tmp_path / ".bundle.q1w2e3r4.tmp"
    (half / "model_repository").mkdir(parents=True)
    (half / "model.onnx").write_bytes(b"half")
    _age(half)
    run_cli("package", "--model", exported_onnx, "--out", tmp_path / "bundle", check=True)
    assert not half.exists() and (tmp_path / "bundle" / "bundle.json").is_file()
