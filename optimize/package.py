"""Stage ``package``: a self-contained folder to copy onto a Jetson or a server.

Layout of ``out``::

    model.onnx, model.onnx.json     the ONNX to run with ONNX Runtime or build an engine from, and its manifest
                                    (for an INT8 engine: the Q/DQ ONNX, re-made from the calibration cache if need be)
    model.fp16.onnx                 with ``precision`` fp16, or for a Q/DQ model: the FP16 copy strongly typed
                                    TensorRT (10.12+, 11) builds FP16 layers from (INT8 ones stay INT8)
    model.plan, model.plan.json     when packaging a TensorRT engine: the engine and its build-engine manifest
                                    (runner.py refuses it on another TensorRT or GPU; build_engine.sh rewrites both)
    model.xml, model.bin, .xml.json when packaging an OpenVINO model: the IR runner.py serves (openvino on the CPU,
                                    with the hint its build measured) and its manifest; model.onnx is its FP32 source
    <name>.calib.json               the calibration cache, when the model is INT8
    labels.txt, preprocess.json     class names, one a line; edgeopt's preprocessing as JSON
    runner.py, requirements.txt     classifies images with numpy + Pillow + onnxruntime (or openvino, or tensorrt +
                                    cuda-python)
    build_engine.sh                 builds model.plan on the device with its own trtexec (8.5 to 11)
    model_repository/<name>/        a Triton Inference Server repository: config.pbtxt, labels.txt, 1/model.*
                                    (model.plan for an engine whose profile starts at batch 1, else model.onnx)
    bundle.json                     what was packaged, from what, and every file's sha256

Everything is written into a temporary folder beside ``out`` and renamed into place at the end, so a failed run
leaves no half-written bundle. The model's files are read from manifests and the ONNX graph; nothing here runs
the model, so an engine can be packaged on a machine without its GPU. No TensorRT timing cache is packaged: its
measurements belong to the GPU that made them (build_engine.sh names its own after the device's GPU).
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import onnx

from .acceptance import write_acceptance_set
from .artifacts import Artifact, calibration_cache_path, library_versions, manifest_path, read_manifest, \
    remove_stale_temp, resolve_data, sha256_file, write_error, write_json
from .build_engine import int8_step
from .configs import DEFAULT_BATCHES, CalibConfig, PackageConfig, acceptance_count, parse_size
from .errors import ConfigError, OutputError, PackageError
from .fp16 import to_fp16_onnx
from .onnx_model import OnnxModel
from .openvino_backend import copy_ir, weights_path
from .preprocess import Preprocessing
from .runners import backend_of
from .tensorrt_backend import MIN_VERSION, Profile

logger = logging.getLogger(__name__)

BUNDLE_FORMAT = "edgeopt-bundle"
TEMPLATES = Path(__file__).with_name("bundle")
DEFAULT_WORKSPACE = "2G"
REQUIREMENTS = """\
# runner.py with model.onnx (onnxruntime-gpu in place of onnxruntime runs it on an NVIDIA GPU)
numpy>=1.24
Pillow>=9.5
onnxruntime>=1.17
# runner.py with an OpenVINO model.xml (x86 or ARM CPUs), in place of onnxruntime: openvino>=2024.0
# runner.py with a TensorRT model.plan, in place of onnxruntime: tensorrt>=8.5 and cuda-python of the driver's CUDA
# major (nvidia-smi shows it; cuda-python 13 fails every call on an older driver), or pycuda>=2022.2:
#   Jetson, JetPack 5 (CUDA 11.4, TensorRT 8.5 from JetPack):   cuda-python>=11.4,<12  (or pycuda)
#   Jetson, JetPack 6 (CUDA 12.2/12.6, TensorRT 8.6/10.3):      cuda-python>=12.0,<13  (or pycuda)
#   server, driver R525-R575 (CUDA 12):                          tensorrt-cu12 cuda-python>=12.0,<13
#   server, driver R580 or later (CUDA 13):                      tensorrt-cu13 cuda-python>=13.0,<14
"""

# an OpenVINO bundle: runner.py serves model.xml
OPENVINO_REQUIREMENTS = """\
# runner.py with model.xml: OpenVINO on the CPU (x86, or ARM64 wheels); onnxruntime>=1.17 in its place runs model.onnx
numpy>=1.24
Pillow>=9.5
openvino>=2024.0
"""

TRITON_CONFIG = """\
{comment}name: {name}
platform: {platform}
max_batch_size: {max_batch}
input [
  {{
    name: {input_name}
    data_type: TYPE_FP32
    dims: [ 3, {size}, {size} ]
  }}
]
output [
  {{
    name: {output_name}
    data_type: TYPE_FP32
    dims: [ {classes} ]
    label_filename: "labels.txt"
  }}
]
dynamic_batching {{
  preferred_batch_size: [ {preferred} ]
  max_queue_delay_microseconds: 2000
}}
"""
# config.pbtxt's comment for a TensorRT plan: Triton deserializes it with its own TensorRT
TRITON_PLAN_NOTE = """\
model.plan must be built by the TensorRT version of the Triton container that serves it, not the host's: run
build_engine.sh inside that container (TRTEXEC=/path/to/its trtexec) or where TensorRT and the GPU model match it.
"""


def check_servable(model: OnnxModel) -> None:
    """Refuse an ONNX a bundle cannot describe: one image input ``[batch, 3, S, S]`` with S fixed and a symbolic
    batch axis (Triton batches), logits with a fixed class count."""
    model.require_dynamic_batch()
    if model.side is None or model.num_classes is None:
        raise PackageError(f"{model.path} takes {list(model.input.shape)} and gives {list(model.output.shape)}: a "
                           "bundle needs the image side and the class count fixed; export it with 'cli.py export'")


def triton_config(name: str, platform: str, model: OnnxModel, profile: Profile, comment: str = "") -> str:
    """Triton's ``config.pbtxt`` (protobuf text format) for a :func:`check_servable` model: batch dim implied,
    dynamic batching up to the profile; ``comment`` goes on top as ``#`` lines."""
    preferred = ", ".join(str(b) for b in sorted({profile.opt_batch, profile.max_batch}))
    comment = "".join(f"# {line}\n" for line in comment.splitlines())
    return TRITON_CONFIG.format(comment=comment, name=_quote(name), platform=_quote(platform),
                                max_batch=profile.max_batch, input_name=_quote(model.input.name),
                                size=model.image_size, output_name=_quote(model.output.name),
                                classes=model.num_classes, preferred=preferred)


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _render(template: str, values: dict[str, Any]) -> str:
    """Replace every ``@KEY@`` of a template file; a placeholder left over is a bug in the template."""
    text = (TEMPLATES / template).read_text()
    for key, value in values.items():
        text = text.replace(f"@{key}@", str(value))
    left = re.findall(r"@[A-Z_]+@", text)
    if left:
        raise PackageError(f"template {template} has unfilled placeholders {left}")
    return text


def _engine_onnx(engine: Path, manifest: dict[str, Any], override: str | None) -> OnnxModel:
    """The ONNX an engine was built from, checked against the sha256 its manifest records (before it is parsed:
    a wrong file is named as such, not as a damaged ONNX)."""
    recorded = manifest.get("inputs", {}).get("onnx", {})
    path = Path(override or recorded.get("path", ""))
    if not path.is_file():
        raise PackageError(f"{engine} was built from {recorded.get('path')}, which is not there; the bundle needs it "
                           "to rebuild the engine on the device: give --onnx")
    if recorded.get("sha256") and sha256_file(path) != recorded["sha256"]:
        raise PackageError(f"{path} is not the ONNX {engine} was built from (sha256 differs); give the right --onnx")
    return OnnxModel.read(path)


def _profile(cfg: PackageConfig, recorded: dict[str, int] | None, binding: bool) -> Profile:
    """The asked batch profile, filled in from ``recorded`` (a build-engine manifest's) or 1/8/64; a TensorRT
    engine's recorded profile is ``binding``: it cannot be changed without rebuilding."""
    asked = (cfg.min_batch, cfg.opt_batch, cfg.max_batch)
    base = (recorded["min_batch"], recorded["opt_batch"], recorded["max_batch"]) if recorded else DEFAULT_BATCHES
    if binding and any(a is not None and a != b for a, b in zip(asked, base)):
        raise ConfigError(f"{cfg.model} was built for batch {base[0]}/{base[1]}/{base[2]}; drop --min-batch, "
                          "--opt-batch and --max-batch, or rebuild it with the profile you want")
    return Profile(*(a if a is not None else b for a, b in zip(asked, base)))


def _calibrated_onnx(engine: Path, manifest: dict[str, Any], fp32_onnx: Path, dst: Path) -> Path:
    """The Q/DQ ONNX of an INT8 engine built from an FP32 ONNX, re-made from its calibration cache; the cache."""
    config = manifest.get("config", {})
    candidates = [Path(p) for p in (config.get("calib_cache"), calibration_cache_path(engine)) if p]
    cache = next((p for p in candidates if p.is_file()), None)
    if cache is None:
        raise PackageError(f"{engine} is INT8 from the FP32 {fp32_onnx}, but its calibration cache "
                           f"({', '.join(map(str, candidates))}) is gone, so the device cannot rebuild it; package "
                           "a Q/DQ ONNX from 'cli.py calibrate --target tensorrt' instead")
    int8_step(CalibConfig(onnx=str(fp32_onnx), out=str(dst), data=None, target="tensorrt",
                          method=config.get("calib_method", "entropy"), cache=str(cache)))
    return cache


def _place(work: Path, out: Path) -> None:
    """Rename the finished ``work`` folder to ``out``, replacing what was there."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(work, 0o777 & ~umask)  # mkdtemp made it 0700
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.{os.getpid()}.old")
        os.rename(out, old)
    os.rename(work, out)
    if old is not None:
        shutil.rmtree(old)


def is_bundle(folder: Path) -> bool:
    """Whether ``folder`` is a bundle this stage wrote: its ``bundle.json`` has ``"format": "edgeopt-bundle"``."""
    try:
        return json.loads((folder / "bundle.json").read_text()).get("format") == BUNDLE_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _check_out(cfg: PackageConfig, source: _Source) -> Path:
    """The bundle folder, resolved. ``--force`` replaces a non-empty folder, but never one holding the model, and
    only a bundle of ours when ``--out`` does not name the folder itself (``.``, ``x/..``) or is the working
    folder, one above it or the home folder."""
    given = Path(cfg.out)
    out = given.resolve()
    if out.exists() and not out.is_dir():
        raise OutputError(f"{given} is a file; give a folder for the bundle")
    for flag, src in (("--model", source.path), ("--onnx", source.onnx)):
        if out == src.resolve() or out in src.resolve().parents:
            raise OutputError(f"--out {given} holds {flag} {src}: replacing it would delete the model; choose "
                              "another --out")
    if out.is_dir() and any(out.iterdir()):
        if not cfg.force:
            raise OutputError(f"{given} exists and is not empty; choose another --out or pass --force to replace it")
        cwd = Path.cwd().resolve()
        unnamed = given.name in ("", ".", "..") or out == cwd or out in cwd.parents or out == Path.home().resolve()
        if unnamed and not is_bundle(out):
            raise OutputError(f"--out {given} is {out}, which is not a bundle 'package' wrote (no {BUNDLE_FORMAT} "
                              "bundle.json): --force only replaces it when --out names it; choose another --out")
        if not is_bundle(out):
            logger.warning("--force: replacing %s, which is not a bundle 'package' wrote", out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create {out.parent}: {e.strerror or e}; choose another --out") from e
    remove_stale_temp(out.parent)
    return out


@dataclass(frozen=True)
class _Source:
    """What is packaged: the ONNX (always, read once), the TensorRT engine (or None) and the model's manifest."""

    path: Path
    model: OnnxModel
    engine: Path | None
    manifest: dict[str, Any]
    openvino: Path | None = None  # an OpenVINO IR's .xml: served by runner.py, model.onnx its FP32 source

    @property
    def onnx(self) -> Path:
        return self.model.path

    @property
    def engine_facts(self) -> dict[str, Any]:
        return self.manifest.get("engine", {}) if self.engine is not None else {}


def _source(cfg: PackageConfig) -> _Source:
    src = Path(cfg.model)
    if not src.is_file():
        raise PackageError(f"model {src} does not exist; check the path")
    backend = backend_of(src)
    if backend == "torch":
        raise PackageError(f"{src} is a PyTorch checkpoint; export it first ('cli.py export --model {src} --out "
                           "runs/model.onnx') and package the ONNX")
    manifest = read_manifest(src) or {}
    if backend == "onnxruntime":
        return _Source(src, OnnxModel.read(src), None, manifest)
    if "engine" not in manifest:
        raise PackageError(f"{src} has no build-engine manifest ({manifest_path(src).name}); build it with "
                           "'cli.py build-engine'")
    if backend == "openvino":

        if not weights_path(src).is_file():
            raise PackageError(f"{src}'s weights {weights_path(src)} are missing (an IR is the .xml and the .bin "
                               "beside it); build it again with 'cli.py build-engine --backend openvino'")
        return _Source(src, _engine_onnx(src, manifest, cfg.onnx), None, manifest, openvino=src)
    return _Source(src, _engine_onnx(src, manifest, cfg.onnx), src, manifest)


def _check_dla(source: _Source, precision: str, profile: Profile) -> None:
    """An engine built for DLA is rebuilt for DLA by build_engine.sh: DLA runs fp16/int8 on a static batch only."""
    dla_core = source.engine_facts.get("flags", {}).get("dla_core")
    if dla_core is None:
        return
    if precision == "fp32":
        raise ConfigError(f"--precision fp32: {source.engine} runs on DLA core {dla_core}, which has no FP32; give "
                          "--precision fp16 or int8")
    if not profile.static:
        raise ConfigError(f"{source.engine} runs on DLA core {dla_core} with batch {profile.min_batch}/"
                          f"{profile.opt_batch}/{profile.max_batch}, but DLA needs a static batch: rebuild it with "
                          "equal --min-batch, --opt-batch and --max-batch")


def _write_onnx(source: _Source, work: Path) -> tuple[Path | None, OnnxModel]:
    """``model.onnx`` (+ manifest) into ``work``: the model's ONNX, or for an INT8 engine built from an FP32 ONNX
    the Q/DQ ONNX re-made from its calibration cache. Returns the calibration cache, if any, and model.onnx."""
    dst = work / "model.onnx"
    if source.engine_facts.get("precision") == "int8" and source.model.precision != "int8":
        cache = _calibrated_onnx(source.engine, source.manifest, source.onnx, dst)
        bundled = OnnxModel.read(dst)
    else:
        if _external_data(source.onnx):  # weights in side files, which the checker kept inside the model's folder
            try:  # folded into the bundle's one file (a ResNet is far below protobuf's 2 GB)
                onnx.save(onnx.load(str(source.onnx)), str(dst))
            except ValueError as e:
                raise PackageError(f"{source.onnx}'s weights do not fit one ONNX file ({e}); package a model under "
                                   "2 GB") from e
            bundled = OnnxModel.read(dst)
            logger.info("%s keeps its weights in external files: folded into the bundle's model.onnx", source.onnx)
        else:
            bundled = replace(source.model, path=dst)  # a copy: the same facts
            shutil.copyfile(source.onnx, dst)
        if manifest_path(source.onnx).is_file():
            shutil.copyfile(manifest_path(source.onnx), manifest_path(dst))
        recorded = (read_manifest(source.onnx) or {}).get("calibration_cache")
        cache = source.onnx.with_name(recorded) if recorded else None
    if cache is None or not cache.is_file():
        return None, bundled
    shutil.copyfile(cache, work / cache.name)
    return cache, bundled


def _external_data(path: Path) -> bool:
    """Whether the ONNX file keeps tensors in external files (``save_as_external_data``)."""
    model = onnx.load(str(path), load_external_data=False)
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)


def _write_triton(source: _Source, work: Path, name: str, profile: Profile, labels: str) -> str:
    """``model_repository/<name>/`` for Triton; returns the platform: ``tensorrt_plan`` for an engine whose profile
    starts at batch 1 (Triton sends any batch from 1 to max_batch_size), else ``onnxruntime_onnx``."""
    repo = work / "model_repository" / name
    (repo / "1").mkdir(parents=True)
    comment = ""
    if source.engine is not None and profile.min_batch == 1:
        platform, comment = "tensorrt_plan", TRITON_PLAN_NOTE
        shutil.copyfile(source.engine, repo / "1" / "model.plan")
    else:
        platform = "onnxruntime_onnx"
        shutil.copyfile(work / "model.onnx", repo / "1" / "model.onnx")
        if source.engine is not None:
            comment = (f"ONNX Runtime runs model.onnx: {source.engine.name}'s profile starts at batch "
                       f"{profile.min_batch}, and Triton sends any batch from 1 to max_batch_size. Package an engine "
                       "built with --min-batch 1 to serve it with TensorRT.")
            logger.warning("the Triton repository runs the ONNX, not %s: %s", source.engine, comment)
    (repo / "config.pbtxt").write_text(triton_config(name, platform, source.model, profile, comment))
    (repo / "labels.txt").write_text(labels)
    return platform


def _write_scripts(source: _Source, work: Path, profile: Profile, precision: str, qdq: bool,
                   triton_plan: str) -> None:
    """``runner.py`` + ``requirements.txt`` and ``build_engine.sh`` with this model's profile and flags;
    ``triton_plan``: the Triton repository's plan that build_engine.sh replaces ("" for none)."""
    shutil.copyfile(TEMPLATES / "runner.py", work / "runner.py")
    (work / "requirements.txt").write_text(OPENVINO_REQUIREMENTS if source.openvino else REQUIREMENTS)
    flags = source.engine_facts.get("flags", {})
    dla_core = flags.get("dla_core")
    workspace = source.manifest.get("config", {}).get("workspace") if source.engine else None
    (work / "build_engine.sh").write_text(_render("build_engine.sh", {
        "PRECISION": precision, "MIN_BATCH": profile.min_batch, "OPT_BATCH": profile.opt_batch,
        "MAX_BATCH": profile.max_batch, "WORKSPACE_MIB": parse_size(workspace or DEFAULT_WORKSPACE) >> 20,
        "INPUT_NAME": source.model.input.name, "IMAGE_SIZE": source.model.image_size, "QDQ": int(qdq),
        "DLA_CORE": "" if dla_core is None else int(dla_core),
        "SPARSITY_FLAG": "--sparsity=enable" if flags.get("sparse_weights") else "", "TRITON_PLAN": triton_plan,
        "INT8_HIGH_PRECISION": flags.get("int8_high_precision") or "fp16",
        "TRT_MIN_MAJOR": MIN_VERSION[0], "TRT_MIN_MINOR": MIN_VERSION[1]}))
    for script in ("runner.py", "build_engine.sh"):
        os.chmod(work / script, 0o755)


def _write_acceptance(cfg: PackageConfig, source: _Source, work: Path, profile: Profile) -> dict[str, Any] | None:
    """``check/``: the acceptance set ``runner.py --check`` runs on the device (:mod:`optimize.acceptance`)."""
    count = acceptance_count(source.model.image_size) if cfg.check_images is None else cfg.check_images
    if count == 0:
        logger.warning("--check-images 0: the bundle has no acceptance set; runner.py --check cannot run on the "
                       "device")
        return None
    sizes = tuple(b for b in cfg.check_batch_sizes if profile.min_batch <= b <= profile.max_batch)
    return write_acceptance_set(work, work / "model.onnx", data=resolve_data(cfg.data, source.onnx), count=count,
                                max_accuracy_drop=cfg.max_accuracy_drop, batch_sizes=sizes or (profile.opt_batch,),
                                served=work / "model.xml" if source.openvino else None)


def _work_folder(out: Path) -> Path:
    """A fresh hidden folder beside ``out`` to write the bundle in (then renamed into place, see :func:`_place`)."""
    try:
        return Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    except OSError as e:
        raise (write_error(out, e) or OutputError(f"cannot write beside {out}: {e}; choose another --out")) from e


def _write_models(cfg: PackageConfig, source: _Source, work: Path, profile: Profile) -> tuple[Path | None, str, bool]:
    """The model files into ``work``: model.onnx, its FP16 copy when TensorRT builds from one, the engine and the
    OpenVINO IR with their manifests. Returns the calibration cache (if any), the precision build_engine.sh builds
    and whether model.onnx is a Q/DQ INT8 ONNX."""
    cache, bundled = _write_onnx(source, work)
    issue = bundled.tensorrt_issue()
    qdq = issue is None and bundled.precision == "int8"
    precision = cfg.precision or source.engine_facts.get("precision") or ("int8" if qdq else "fp32")
    if precision == "int8" and not qdq:
        raise ConfigError(f"--precision int8 needs a Q/DQ ONNX ('cli.py calibrate --target tensorrt'); "
                          f"{source.onnx} is not one")
    _check_dla(source, precision, profile)
    if issue:
        logger.warning("build_engine.sh cannot build from %s: %s; package the FP32 ONNX from 'export' or a Q/DQ "
                       "one from 'calibrate --target tensorrt' for TensorRT", source.onnx, issue)
    if precision == "fp16" or qdq:  # strongly typed TensorRT builds FP16 layers from it (INT8 ones for Q/DQ)
        to_fp16_onnx(work / "model.onnx", work / "model.fp16.onnx")
    if source.engine is not None:
        shutil.copyfile(source.engine, work / "model.plan")
        shutil.copyfile(manifest_path(source.engine), work / "model.plan.json")
    if source.openvino is not None:
        copy_ir(source.openvino, work / "model.xml")
        shutil.copyfile(manifest_path(source.openvino), manifest_path(work / "model.xml"))
    return cache, precision, qdq


def _bundle_payload(source: _Source, work: Path, name: str, profile: Profile, *, precision: str, qdq: bool,
                    platform: str, cache: Path | None, acceptance: dict[str, Any] | None,
                    preprocessing: Preprocessing, class_names: list[str]) -> dict[str, Any]:
    """``bundle.json``: what the bundle holds and how it was made, with every file written so far in ``work``."""
    return {
        "format": BUNDLE_FORMAT, "version": 1,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "source": {"path": str(source.path), "sha256": sha256_file(source.path),
                   "stage": source.manifest.get("stage")},
        "name": name, "precision": precision, "qdq": qdq,
        "serves": {"file": "model.xml" if source.openvino else "model.plan" if source.engine else "model.onnx",
                   "precision": (source.manifest.get("engine") or {}).get("precision") or precision},
        "profile": {"min_batch": profile.min_batch, "opt_batch": profile.opt_batch,
                    "max_batch": profile.max_batch},
        "input": {"name": source.model.input.name, "shape": ["batch", 3, *[source.model.image_size] * 2],
                  "dtype": "float32"},
        "output": {"name": source.model.output.name, "shape": ["batch", source.model.num_classes],
                   "dtype": "float32"},
        "preprocessing": preprocessing.to_dict(), "class_names": class_names,
        "triton": {"repository": "model_repository", "model": name, "platform": platform,
                   "max_batch_size": profile.max_batch},
        "calibration_cache": cache.name if cache else None,
        "acceptance_set": acceptance,
        "versions": library_versions(),
        "files": {str(p.relative_to(work)): {"sha256": sha256_file(p), "bytes": p.stat().st_size}
                  for p in sorted(work.rglob("*")) if p.is_file()},
    }


def run(cfg: PackageConfig) -> Artifact:
    """Write the bundle for ``cfg.model``; returns the bundle folder with ``bundle.json`` as its manifest."""
    source = _source(cfg)
    out = _check_out(cfg, source)
    preprocessing, class_names = source.model.preprocessing()
    check_servable(source.model)
    recorded = source.manifest.get("engine", {}).get("profile")
    profile = _profile(cfg, recorded, binding=source.engine is not None)
    name = cfg.name or re.sub(r"[^A-Za-z0-9_-]", "_", source.path.stem)
    work = _work_folder(out)
    try:
        cache, precision, qdq = _write_models(cfg, source, work, profile)
        labels = "".join(n.replace("\n", " ") + "\n" for n in class_names)
        (work / "labels.txt").write_text(labels)
        write_json(work / "preprocess.json", preprocessing.to_dict())
        platform = _write_triton(source, work, name, profile, labels)
        _write_scripts(source, work, profile, precision, qdq,
                       f"model_repository/{name}/1/model.plan" if platform == "tensorrt_plan" else "")
        acceptance = _write_acceptance(cfg, source, work, profile)
        payload = _bundle_payload(source, work, name, profile, precision=precision, qdq=qdq, platform=platform,
                                  cache=cache, acceptance=acceptance, preprocessing=preprocessing,
                                  class_names=class_names)
        write_json(work / "bundle.json", payload)
        _place(work, out)
    except BaseException as e:
        shutil.rmtree(work, ignore_errors=True)
        failure = write_error(out, e) if isinstance(e, OSError) else None  # a full disk, a read-only folder
        if failure is not None:
            raise failure from e
        raise
    logger.info("packaged %s into %s (%d files; Triton model '%s', %s)", source.path, out, len(payload["files"]),
                name, platform)
    return Artifact(out, payload)
