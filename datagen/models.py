"""Where each stage's weights come from, for the two profiles.

- `production`: the real checkpoints, by hub id (read from the local HF cache, never downloaded
  at run time) or by a local directory given in the environment. A missing weight fails at
  setup with a message naming the model and the command that fetches it.
- `tiny`: random-weight twins built offline from configs through the SAME library classes, saved
  in the same folder layouts, so the production loading code loads them unchanged. They live in
  one directory (`datagen models tiny DIR`, or built on first use).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from datagen.stage import ModelRef

PROFILES = ("tiny", "production")
TWIN_MANIFEST = ".datagen-twin.json"
TINY_DIR_ENV = "DATAGEN_TINY_MODELS"
TINY_FORMAT = 1  # bump when a twin's config changes, so stale twins get rebuilt


class MissingModelError(RuntimeError):
    """A production weight is not available locally."""


@dataclass(frozen=True)
class ModelSource:
    """One model a stage loads. `env` names a variable that may point at a local directory."""

    key: str
    hub_id: str
    purpose: str
    files: tuple[str, ...] = ()  # files that must exist in the snapshot (besides configs)
    twin: str = ""  # "module:function" that builds the tiny twin into a directory

    @property
    def env(self) -> str:
        return f"DATAGEN_MODEL_{self.key.upper()}"

    def download_command(self) -> str:
        include = "".join(f" --include '{f}'" for f in self.files)
        return f"hf download {self.hub_id}{include}"


SOURCES: dict[str, ModelSource] = {
    source.key: source
    for source in (
        ModelSource(
            "depth_anything",
            "depth-anything/Depth-Anything-V2-Large-hf",
            "control: depth",
            twin="datagen.twins.depth:build_depth_anything",
        ),
        ModelSource(
            "annotators",
            "lllyasviel/Annotators",
            "control: OpenPose / MiDaS",
            files=("body_pose_model.pth", "hand_pose_model.pth", "facenet.pth"),
            twin="datagen.twins.annotators:build_annotators",
        ),
        ModelSource(
            "dwpose",
            "yzd-v/DWPose",
            "control: DWPose (YOLOX-L detector + DW-LL pose, ONNX)",
            files=("yolox_l.onnx", "dw-ll_ucoco_384.onnx"),
            twin="datagen.twins.annotators:build_dwpose",
        ),
        ModelSource(
            "sdxl",
            "stabilityai/stable-diffusion-xl-base-1.0",
            "stylize: SDXL base",
            twin="datagen.twins.sdxl:build_sdxl",
        ),
        ModelSource(
            "controlnet_depth_sdxl",
            "diffusers/controlnet-depth-sdxl-1.0",
            "stylize: depth ControlNet",
            twin="datagen.twins.sdxl:build_controlnet_depth_sdxl",
        ),
        ModelSource(
            "ip_adapter",
            "h94/IP-Adapter",
            "stylize: IP-Adapter (InstantStyle)",
            files=("sdxl_models/ip-adapter_sdxl.safetensors", "sdxl_models/image_encoder/*"),
            twin="datagen.twins.sdxl:build_ip_adapter",
        ),
        ModelSource(
            "wan_vace",
            "Wan-AI/Wan2.1-VACE-14B-diffusers",
            "animate: image-to-video under control",
            twin="datagen.twins.wan:build_wan_vace",
        ),
        ModelSource(
            "qwen_vl",
            "Qwen/Qwen2.5-VL-7B-Instruct",
            "caption and judge",
            twin="datagen.twins.qwen:build_qwen_vl",
        ),
        ModelSource(
            "csd",
            "tomg-group-umd/CSD-ViT-L",
            "score: CSD style similarity",
            files=("pytorch_model.bin",),
            twin="datagen.twins.csd:build_csd",
        ),
        ModelSource(
            "dinov2",
            "facebook/dinov2-base",
            "score: DINOv2 structure",
            twin="datagen.twins.dinov2:build_dinov2",
        ),
    )
}

# Lighter production alternatives a config may name instead of the default hub id.
ALTERNATIVES = {"wan_vace": ["Wan-AI/Wan2.1-VACE-1.3B-diffusers"]}


@dataclass(frozen=True)
class ResolvedModel:
    """A model ready to load: a local directory and the revision to record."""

    key: str
    path: Path
    ref: ModelRef


def default_tiny_dir() -> Path:
    configured = os.environ.get(TINY_DIR_ENV)
    if configured:
        return Path(configured)
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return cache / "datagen" / f"tiny-models-v{TINY_FORMAT}"


def resolve(
    key: str, profile: str, tiny_dir: str | os.PathLike | None = None, hub_id: str | None = None
) -> ResolvedModel:
    """The local directory of model `key` in `profile`; builds a missing tiny twin."""
    if key not in SOURCES:
        raise KeyError(f"unknown model {key!r}; known: {sorted(SOURCES)}")
    if profile == "tiny":
        return _resolve_tiny(SOURCES[key], Path(tiny_dir) if tiny_dir else default_tiny_dir())
    if profile == "production":
        return _resolve_production(SOURCES[key], hub_id)
    raise ValueError(f"unknown profile {profile!r}; expected one of {PROFILES}")


# --- production ----------------------------------------------------------------------------


def _resolve_production(source: ModelSource, hub_id: str | None) -> ResolvedModel:
    local = os.environ.get(source.env)
    if local:
        path = Path(local)
        if not path.is_dir():
            raise MissingModelError(f"{source.key}: {source.env}={local} is not a directory")
        return ResolvedModel(source.key, path, ModelRef(str(path), directory_revision(path)))
    repo = hub_id or source.hub_id
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        snapshot = Path(snapshot_download(repo, local_files_only=True, cache_dir=hf_cache_dir()))
    except (LocalEntryNotFoundError, FileNotFoundError, OSError) as error:
        command = source.download_command().replace(source.hub_id, repo)
        raise MissingModelError(
            f"{source.key} ({source.purpose}): {repo} is not in the local Hugging Face cache "
            f"({error.__class__.__name__}). Fetch it with:\n    {command}\n"
            f"or point {source.env} at a local copy."
        ) from None
    missing = [f for f in source.files if "*" not in f and not (snapshot / f).exists()]
    if missing:
        raise MissingModelError(
            f"{source.key}: {repo} is cached but lacks {missing}. Fetch them with:\n    "
            f"{source.download_command().replace(source.hub_id, repo)}"
        )
    return ResolvedModel(source.key, snapshot, ModelRef(repo, snapshot.name))


def hf_cache_dir() -> str | None:
    """The Hugging Face hub cache, read from the environment now (huggingface_hub reads it once,
    at import), so a process can point at another cache after start-up."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    return None


def check_production() -> list[dict]:
    """For each production model: present locally or missing, with the fetch command."""
    report = []
    for source in SOURCES.values():
        entry = {"key": source.key, "hub_id": source.hub_id, "purpose": source.purpose}
        try:
            resolved = _resolve_production(source, None)
            entry |= {
                "present": True,
                "path": str(resolved.path),
                "revision": resolved.ref.revision,
            }
        except MissingModelError as error:
            entry |= {
                "present": False,
                "error": str(error).splitlines()[0],
                "fetch": source.download_command(),
            }
        report.append(entry)
    return report


# --- tiny twins ----------------------------------------------------------------------------


def directory_revision(path: Path) -> str:
    """sha256 over the relative names and contents of every file in a model directory."""
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file() and p.name != TWIN_MANIFEST):
        digest.update(str(file.relative_to(path)).encode() + b"\0")
        with open(file, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return "sha256:" + digest.hexdigest()


def _twin_builder(source: ModelSource):
    module, function = source.twin.split(":")
    return getattr(importlib.import_module(module), function)


@contextlib.contextmanager
def _build_lock(root: Path):
    """One builder at a time per tiny dir (several actors may start together)."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def build_twin(key: str, root: Path, force: bool = False) -> ResolvedModel:
    """Build the tiny twin of `key` under root/key (seeded, so builds are reproducible)."""
    source = SOURCES[key]
    target = root / key
    with _build_lock(root):
        manifest = target / TWIN_MANIFEST
        if manifest.exists() and not force:
            recorded = json.loads(manifest.read_text())
            if recorded.get("format") == TINY_FORMAT:
                return ResolvedModel(key, target, ModelRef(f"tiny/{key}", recorded["revision"]))
        staging = root / f".{key}.building-{os.getpid()}"
        import shutil

        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        _twin_builder(source)(staging)
        revision = directory_revision(staging)
        (staging / TWIN_MANIFEST).write_text(
            json.dumps(
                {"key": key, "mirrors": source.hub_id, "format": TINY_FORMAT, "revision": revision},
                indent=2,
            )
        )
        shutil.rmtree(target, ignore_errors=True)
        os.replace(staging, target)  # the twin appears complete or not at all
    return ResolvedModel(key, target, ModelRef(f"tiny/{key}", revision))


def _resolve_tiny(source: ModelSource, root: Path) -> ResolvedModel:
    return build_twin(source.key, root)


def build_all_twins(root: Path, force: bool = False) -> list[ResolvedModel]:
    return [build_twin(key, root, force=force) for key in SOURCES]
