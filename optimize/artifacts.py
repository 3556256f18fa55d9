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
import hashlib
import json
import logging
import os
import platform
import tempfile
from pathlib import Path
from typing import Any, Iterator

from .errors import OutputError

logger = logging.getLogger(__name__)

MANIFEST_SUFFIX = ".json"


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Return the hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def prepare_output(path: str | os.PathLike) -> Path:
    """Create ``path``'s folder if missing and prove it is writable, before any long work starts.

    Raises:
        OutputError: the folder cannot be created or written, naming the path and the fix.
    """
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{path} is a directory; give a file name for the output, e.g. {path / 'model.pth'}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".probe"):
            pass
    except OSError as e:
        raise OutputError(
            f"cannot write {path}: {e.strerror or e}; choose an output path in a writable folder"
        ) from e
    return path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds."""
    path = Path(path)
    prepare_output(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)  # mkstemp makes 0600; the artifact gets a normal file's mode
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
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


def library_versions() -> dict[str, str]:
    """Versions of the libraries whose behaviour an artifact depends on."""
    versions = {"python": platform.python_version()}
    for name in ("torch", "torchvision", "numpy", "onnx", "onnxruntime", "tensorrt"):
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
