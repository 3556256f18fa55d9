"""Writing artifacts safely and describing them with a JSON manifest.

Every artifact edgeopt writes (``.pth``, ``.onnx``, ``.engine``) goes to a temporary file in the same folder
and is renamed into place only when complete, so an interrupted or failed stage never leaves a half-written
file under the name a later stage reads. Beside it lies ``<artifact>.json``: the stage, its config, the
sha256 of its inputs, the preprocessing, the class names, library versions and metrics. Later stages read
the manifest instead of asking the user again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import errno
import hashlib
import json
import logging
import os
import platform
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator, Mapping

from .configs import FASHION_MNIST
from .errors import DataError, OutputError

logger = logging.getLogger(__name__)

MANIFEST_SUFFIX = ".json"
# Our temporary names: ``.NAME.XXXXXXXX.tmp`` / ``.probe`` (tempfile's 8 random characters) beside an output, a
# package's ``.NAME.PID.old`` folder, and ``edgeopt-<step>-XXXXXXXX`` folders in the system temp folder.
_TEMP_BESIDE = re.compile(r"^\..+\.(?:[a-z0-9_]{8}\.(?:tmp|probe)|\d+\.old)$")
# the writer's pid in a temporary file's name (".model.onnx.p1234.x8k2m0qa.tmp"): once that process is gone, the
# file is a killed run's leftover whatever its age
_TEMP_PID = re.compile(r"\.p(\d+)\.[a-z0-9_]{8}\.(?:tmp|probe)$")
_TEMP_SYSTEM = re.compile(r"^edgeopt-(?:calib|engine|bench)-[a-z0-9_]{8}$")
STALE_AFTER_S = 3600.0
# errors that mean "this output cannot be written here", whatever the stage was doing
_SPACE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_WRITE_ERRNOS = _SPACE_ERRNOS | {errno.EROFS, errno.EACCES, errno.EPERM}
_LOW_SPACE = 1 << 20


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Return the hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def prepare_output(path: str | os.PathLike) -> Path:
    """Create ``path``'s folder if missing and prove it is writable, before any long work starts.

    Also removes the temporary files a killed run left in that folder and in the system temp folder (see
    :func:`remove_stale_temp`).

    Raises:
        OutputError: the folder cannot be created or written, naming the path and the fix.
    """
    path = _check_writable(path)
    remove_stale_temp(path.parent)
    remove_stale_temp(Path(tempfile.gettempdir()), pattern=_TEMP_SYSTEM)
    return path


def _check_writable(path: str | os.PathLike) -> Path:
    if str(path).endswith(("/", os.sep)):  # Path() would drop the slash and write a file named like the folder
        raise OutputError(f"{path} names a folder; give a file name for the output, e.g. "
                          f"{Path(path) / 'model.onnx'}")
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{path} is a directory; give a file name for the output, e.g. {path / 'model.pth'}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.p{os.getpid()}.", suffix=".probe"):
            pass
    except OSError as e:
        raise OutputError(
            f"cannot write {path}: {e.strerror or e}; choose an output path in a writable folder"
        ) from e
    return path


def check_not_input(out: str | os.PathLike, inputs: Mapping[str, str | os.PathLike | None],
                    flag: str = "--out") -> None:
    """Refuse an output that would overwrite one of a stage's inputs, or an input's manifest.

    Paths are compared resolved (symlinks, ``..``) and, where both exist, by :func:`os.path.samefile` (hard
    links). Call it at the start of a stage's ``run()``, before anything is written.

    Args:
        out: the path the stage will write (its manifest goes beside it).
        inputs: the files the stage reads, by option name, e.g. ``{"--model": cfg.model}``; ``None`` skipped.
        flag: the output's option name, for the message.

    Raises:
        OutputError: naming both paths and asking for another output.
    """
    out = Path(out)
    for name, given in inputs.items():
        if given is None or str(given) == "":
            continue
        src = Path(given)
        if _same_file(out, src):
            raise OutputError(f"{flag} {out} is the {name} file {src}: writing it would destroy the input; choose "
                              f"another {flag}")
        if _same_file(out, manifest_path(src)) or _same_file(manifest_path(out), src):
            raise OutputError(f"{flag} {out} and {name} {src}: one is the other's manifest, so writing would destroy "
                              f"the input; choose another {flag}")


def _same_file(a: Path, b: Path) -> bool:
    try:
        if a.resolve() == b.resolve():
            return True
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except (OSError, RuntimeError):  # a symlink loop, an unreadable folder: not provably the same
        return False


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def remove_stale_temp(folder: str | os.PathLike, *, pattern: re.Pattern[str] = _TEMP_BESIDE,
                      older_than_s: float = STALE_AFTER_S) -> list[Path]:
    """Remove the temporary files and folders a killed edgeopt run left in ``folder``.

    Only names of our own pattern are touched (``.NAME.XXXXXXXX.tmp`` and ``.probe`` from :func:`atomic_path`
    and :func:`prepare_output`, a package's ``.NAME.XXXXXXXX.tmp`` work folder and ``.NAME.PID.old`` folder; in
    the system temp folder ``edgeopt-calib-*``, ``edgeopt-engine-*``, ``edgeopt-bench-*``), and only when
    nothing in them changed for ``older_than_s`` (an hour): a run still writing one touches it far more often,
    so a concurrent run's files survive. A temporary file naming its writer's pid (``.NAME.pPID.XXXXXXXX.tmp``)
    goes as soon as that process is gone. Each removal is logged as a warning; one that fails is skipped.

    Returns:
        The paths removed.
    """
    removed = []
    now = time.time()
    try:
        entries = [e for e in os.scandir(folder) if pattern.match(e.name)]
    except OSError:
        return removed
    for entry in entries:
        path = Path(entry.path)
        owner = _TEMP_PID.search(entry.name)
        try:
            if (owner is None or _process_alive(int(owner.group(1)))) and now - _newest_mtime(path) < older_than_s:
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
        except OSError as e:
            logger.debug("could not remove stale %s: %s", path, e)
            continue
        logger.warning("removed stale temporary %s left by an interrupted run", path)
        removed.append(path)
    return removed


def _newest_mtime(path: Path) -> float:
    newest = path.lstat().st_mtime
    if path.is_dir() and not path.is_symlink():
        for root, dirs, files in os.walk(path):
            for name in dirs + files:
                with contextlib.suppress(OSError):
                    newest = max(newest, os.lstat(os.path.join(root, name)).st_mtime)
    return newest


def write_error(path: str | os.PathLike, error: BaseException, flag: str = "--out") -> OutputError | None:
    """The :class:`OutputError` to raise when ``error`` means ``path`` could not be written, else ``None``.

    An :class:`OSError` counts by its errno (no space, quota, read-only, permission). ``torch.save`` reports a
    full disk as a ``RuntimeError`` without one ("unexpected pos"), so a ``RuntimeError`` counts when its text
    speaks of a failed write or when ``path``'s file system has (almost) no space left.
    """
    path = Path(path)
    reason, fix = None, f"free space or choose another {flag}"
    if isinstance(error, OSError) and error.errno in _WRITE_ERRNOS:
        reason = error.strerror or str(error)
        if error.errno not in _SPACE_ERRNOS:
            fix = f"choose another {flag} in a writable folder"
    elif isinstance(error, RuntimeError):
        text = str(error).lower()
        if _free_bytes(path) < _LOW_SPACE:
            reason = "no space left on device"
        elif "write" in text and "fail" in text:
            reason = f"the write failed ({(str(error).splitlines() or [''])[0]})"
    if reason is None:
        return None
    return OutputError(f"cannot write {path}: {reason}; {fix}")


def _free_bytes(path: Path) -> int:
    for folder in (path, *path.parents):
        with contextlib.suppress(OSError):
            st = os.statvfs(folder)
            return st.f_bavail * st.f_frsize
    return 1 << 62


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds.

    The temporary file is removed whatever happens; a failed write (full disk, read-only folder) raises
    :class:`OutputError` naming ``path``.
    """
    path = _check_writable(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.p{os.getpid()}.", suffix=".tmp")
        os.close(fd)
    except OSError as e:
        raise write_error(path, e) or e
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)  # mkstemp makes 0600; the artifact gets a normal file's mode
        os.replace(tmp_path, path)
    except (OSError, RuntimeError) as e:
        failure = write_error(path, e)  # measured before the temporary file frees its space
        if failure is None:
            raise
        raise failure from e
    finally:
        with contextlib.suppress(OSError):
            tmp_path.unlink()


def write_json(path: str | os.PathLike, payload: Any) -> Path:
    """Write ``payload`` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(payload, indent=2, sort_keys=False, default=_json_default) + "\n")
    return Path(path)


def _json_default(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"cannot write {type(obj).__name__} to JSON")


def manifest_path(artifact: str | os.PathLike) -> Path:
    """The manifest lying beside ``artifact``: ``runs/model.onnx`` -> ``runs/model.onnx.json``."""
    artifact = Path(artifact)
    return artifact.with_name(artifact.name + MANIFEST_SUFFIX)


# -- the names of derived artifacts: every stage that writes or looks for one asks here -------------------------

def calibration_cache_path(out: str | os.PathLike) -> Path:
    """The calibration cache beside an INT8 output (a calibrated ONNX, an engine): ``<out stem>.calib.json``.

    ``runs/model.int8.onnx`` and ``runs/model.int8.engine`` -> ``runs/model.int8.calib.json``: calibrate writes
    it, build-engine's INT8 step writes or reuses it, package looks for an engine's there.
    """
    out = Path(out)
    return out.with_name(f"{out.stem}.calib.json")


def last_checkpoint_path(out: str | os.PathLike) -> Path:
    """The resumable checkpoint beside ``out``: ``runs/teacher.pth`` -> ``runs/teacher.last.pth``."""
    out = Path(out)
    return out.with_name(f"{out.stem}.last{out.suffix or '.pth'}")


def engine_path(folder: str | os.PathLike, backend: str, precision: str) -> Path:
    """An engine's name in a run folder: ``model[.<precision>]`` (nothing for fp32), then ``.engine`` (TensorRT),
    ``.ort.onnx`` (ONNX Runtime) or ``.ov.xml`` (OpenVINO): ``runs/model.int8.engine``, ``runs/model.ort.onnx``."""
    stem = "model" if precision == "fp32" else f"model.{precision}"
    return Path(folder) / (stem + {"onnxruntime": ".ort.onnx", "openvino": ".ov.xml"}.get(backend, ".engine"))


def library_versions() -> dict[str, str]:
    """Versions of the libraries whose behaviour an artifact depends on."""
    versions = {"python": platform.python_version()}
    for name in ("torch", "torchvision", "numpy", "onnx", "onnxruntime", "openvino", "nncf", "tensorrt"):
        try:
            module = __import__(name)
        except Exception:  # noqa: BLE001 - an absent or broken optional library is simply not recorded
            continue
        versions[name] = getattr(module, "__version__", "unknown")
    return versions


def write_manifest(
    artifact: str | os.PathLike,
    *,
    stage: str,
    config: Any,
    inputs: dict[str, Any] | None = None,
    preprocessing: dict[str, Any] | None = None,
    class_names: list[str] | None = None,
    metrics: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write the JSON manifest beside ``artifact`` (which must already exist) and return its path."""
    artifact = Path(artifact)
    payload = {
        "stage": stage,
        "artifact": artifact.name,
        "sha256": sha256_file(artifact),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "config": dataclasses.asdict(config) if dataclasses.is_dataclass(config) else config,
        "inputs": inputs or {},
        "preprocessing": preprocessing,
        "class_names": class_names,
        "metrics": metrics or {},
        "versions": library_versions(),
    }
    if extra:
        payload.update(extra)
    return write_json(manifest_path(artifact), payload)


def read_manifest(artifact: str | os.PathLike) -> dict[str, Any] | None:
    """Return the manifest beside ``artifact``, or ``None`` if there is none."""
    path = manifest_path(artifact)
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        logger.warning("ignoring unreadable manifest %s: %s", path, e)
        return None


@dataclasses.dataclass
class Artifact:
    """What a stage returns: the file it wrote and that file's manifest."""

    path: Path
    manifest: dict[str, Any]

    @classmethod
    def of(cls, path: str | os.PathLike) -> "Artifact":
        return cls(Path(path), read_manifest(path) or {})


# -- the data an artifact was made from -------------------------------------------------------------------------

def recorded_data(artifact: str | os.PathLike) -> tuple[str, Path] | None:
    """The data set ``artifact`` was trained (or exported, calibrated) on, and the manifest that says so.

    Walks the manifests back through their inputs (engine -> INT8 ONNX -> ONNX -> pruned -> student): the first
    that records data wins (``inputs.data.data`` of train / distill / prune, ``config.data`` of export and
    calibrate). None when no manifest on the way records any.
    """
    seen: set[str] = set()
    todo = [Path(artifact)]
    while todo:
        current = todo.pop(0)
        key = str(current.resolve()) if current.exists() else str(current)
        if key in seen:
            continue
        seen.add(key)
        manifest = read_manifest(current) or {}
        inputs = manifest.get("inputs") if isinstance(manifest.get("inputs"), dict) else {}
        config = manifest.get("config") if isinstance(manifest.get("config"), dict) else {}
        data = inputs.get("data") if isinstance(inputs.get("data"), dict) else {}
        for name in (data.get("data"), config.get("data") if manifest.get("stage") in ("export", "calibrate") else None):
            if isinstance(name, str) and name:
                return name, manifest_path(current)
        for field in ("onnx", "model", "student", "teacher"):
            parent = inputs.get(field)
            if isinstance(parent, dict) and isinstance(parent.get("path"), str):
                todo.append(Path(parent["path"]))
    return None


def resolve_data(data: str | None, artifact: str | os.PathLike, *, default: str | None = FASHION_MNIST,
                 flag: str = "--data") -> str | None:
    """``data`` when given, else the data ``artifact`` records (:func:`recorded_data`), else ``default``.

    Logs which it took, so a user sees where the images come from.

    Raises:
        DataError: the recorded data is a folder that is not here, naming the manifest and ``flag``.
    """

    if data:
        return data
    found = recorded_data(artifact)
    if found is None:
        if default is not None:
            logger.info("%s records no data set: using %s (%s overrides)", artifact, default, flag)
        return default
    name, where = found
    if name != FASHION_MNIST and not Path(name).is_dir():
        raise DataError(f"{where} records the data folder {name}, which is not here; give {flag} with the folder "
                        f"{Path(artifact).name} was trained on")
    logger.info("data: %s, as recorded in %s (%s overrides)", name, where, flag)
    return name
