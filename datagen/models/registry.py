"""Where each stage's weights come from, for the two profiles.

- `production`: the real checkpoints, by hub id (read from the local HF cache, never downloaded
  at run time) or by a local directory given in the environment. A missing weight fails at
  setup with a message naming the model, the file pattern that matched nothing, and the
  command that fetches it.
- `tiny`: random-weight twins built offline from configs through the SAME library classes, saved
  in the same folder layouts, so the production loading code loads them unchanged. They live in
  one directory (`datagen models tiny DIR`, or built on first use).

Each source lists, once, the files its production loader reads (`ModelSource.files`, glob
patterns as `hf download --include` and huggingface_hub match them: `*` crosses `/`). The same
list is what must be present for the model to count as present, and what the fetch command
downloads, so a check that passes means the loader finds its files, and a fetch downloads
nothing the loader does not read (SDXL's repository alone holds fp32, fp16, ONNX and OpenVINO
copies of every weight). Where the hub repository carries half-precision copies, the source
names the variant (`ModelSource.variant = "fp16"`) and lists the variant files; a snapshot or
local directory that holds the plain files instead still resolves, with `ResolvedModel.variant`
None. Loaders pass `variant=resolved.variant` to `from_pretrained`.

`install_twins_in_hub_cache(hub_cache)` places every tiny twin in a Hugging Face hub cache
under its production hub id, with the file names the production loaders read (fp16 variant
names included), so a production build runs offline on twins kept where real weights live.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from datagen.core.stage import ModelRef

PROFILES = ("tiny", "production")
TWIN_MANIFEST = ".datagen-twin.json"
TINY_DIR_ENV = "DATAGEN_TINY_MODELS"
TINY_FORMAT = 2  # bump when a twin's config changes, so stale twins get rebuilt


class MissingModelError(RuntimeError):
    """A production weight is not available locally."""


@dataclass(frozen=True)
class ModelSource:
    """One model a stage loads. `env` names a variable that may point at a local directory.

    `files`: glob patterns (relative to the repository root) of every file the production
    loader reads; each must match at least one file for the model to be present, and they are
    the fetch command's `--include` list. `variant`: the weight variant those patterns name
    ("fp16": `*.fp16.safetensors`), or None; `plain_files` are the same patterns without it.
    """

    key: str
    hub_id: str
    purpose: str
    files: tuple[str, ...] = ()
    twin: str = ""  # "module:function" that builds the tiny twin into a directory
    variant: str | None = None

    @property
    def env(self) -> str:
        return f"DATAGEN_MODEL_{self.key.upper()}"

    @property
    def plain_files(self) -> tuple[str, ...]:
        """`files` with the variant taken out of the weight names (what save_pretrained writes
        without a variant, and what a full-precision download holds)."""
        if not self.variant:
            return self.files
        return tuple(pattern.replace(f".{self.variant}.", ".") for pattern in self.files)

    def download_command(self, hub_id: str | None = None) -> str:
        include = "".join(f" --include '{pattern}'" for pattern in self.files)
        return f"hf download {hub_id or self.hub_id}{include}"


def with_variant(name: str, variant: str | None) -> str:
    """A weight file's name in `variant` (`a/model.safetensors` -> `a/model.fp16.safetensors`),
    as diffusers and transformers name variant files (before the last suffix, or before
    `.json` in a shard index)."""
    if not variant:
        return name
    folder, _, base = name.rpartition("/")
    stem, dot, suffix = base.rpartition(".")
    if not dot:
        return name
    renamed = f"{stem}.{variant}.{suffix}"
    return f"{folder}/{renamed}" if folder else renamed


# Tokenizer folders hold different files in the real repositories (vocab.json + merges.txt)
# and in the twins (tokenizer.json, as transformers 5 saves them): the folder is the pattern.
SDXL_FILES = (
    "model_index.json",
    "scheduler/scheduler_config.json",
    "tokenizer/*",
    "tokenizer_2/*",
    "text_encoder/config.json",
    "text_encoder/model.fp16.safetensors",
    "text_encoder_2/config.json",
    "text_encoder_2/model.fp16.safetensors",
    "unet/config.json",
    "unet/diffusion_pytorch_model.fp16.safetensors",
    "vae/config.json",
    "vae/diffusion_pytorch_model.fp16.safetensors",
)

# The 14B repository shards its transformer and text encoder (`*-0000k-of-0000n.safetensors` +
# `*.safetensors.index.json`); the 1.3B one and the twin hold single files. Both match.
WAN_FILES = (
    "model_index.json",
    "scheduler/scheduler_config.json",
    "tokenizer/*",
    "text_encoder/config.json",
    "text_encoder/model*.safetensors*",
    "transformer/config.json",
    "transformer/diffusion_pytorch_model*.safetensors*",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
)

SOURCES: dict[str, ModelSource] = {
    source.key: source
    for source in (
        ModelSource(
            "depth_anything",
            "depth-anything/Depth-Anything-V2-Large-hf",
            "control: depth",
            files=("config.json", "model.safetensors", "preprocessor_config.json"),
            twin="datagen.models.twins.depth:build_depth_anything",
        ),
        ModelSource(
            "annotators",
            "lllyasviel/Annotators",
            "control: OpenPose body",
            # The pose control reads the body model only (hands and faces are not drawn).
            files=("body_pose_model.pth",),
            twin="datagen.models.twins.annotators:build_annotators",
        ),
        ModelSource(
            "dwpose",
            "yzd-v/DWPose",
            "control: DWPose (YOLOX-L detector + DW-LL pose, ONNX)",
            files=("yolox_l.onnx", "dw-ll_ucoco_384.onnx"),
            twin="datagen.models.twins.annotators:build_dwpose",
        ),
        ModelSource(
            "sdxl",
            "stabilityai/stable-diffusion-xl-base-1.0",
            "stylize: SDXL base",
            files=SDXL_FILES,
            twin="datagen.models.twins.sdxl:build_sdxl",
            variant="fp16",
        ),
        ModelSource(
            "controlnet_depth_sdxl",
            "diffusers/controlnet-depth-sdxl-1.0",
            "stylize: depth ControlNet",
            files=("config.json", "diffusion_pytorch_model.fp16.safetensors"),
            twin="datagen.models.twins.sdxl:build_controlnet_depth_sdxl",
            variant="fp16",
        ),
        ModelSource(
            "ip_adapter",
            "h94/IP-Adapter",
            "stylize: IP-Adapter (InstantStyle)",
            # load_ip_adapter(subfolder="sdxl_models", weight_name=...) reads the adapter and
            # the image encoder in sdxl_models/image_encoder/ (safetensors only: not the .bin).
            files=(
                "sdxl_models/ip-adapter_sdxl.safetensors",
                "sdxl_models/image_encoder/config.json",
                "sdxl_models/image_encoder/model.safetensors",
            ),
            twin="datagen.models.twins.sdxl:build_ip_adapter",
        ),
        ModelSource(
            "wan_vace",
            "Wan-AI/Wan2.1-VACE-14B-diffusers",
            "animate: image-to-video under control",
            files=WAN_FILES,
            twin="datagen.models.twins.wan:build_wan_vace",
        ),
        ModelSource(
            "qwen_vl",
            "Qwen/Qwen2.5-VL-7B-Instruct",
            "describe, caption and judge",
            # AutoProcessor + Qwen2_5_VLForConditionalGeneration. The hub repository has
            # preprocessor_config.json and chat_template.json, the twin (transformers 5's
            # save_pretrained) processor_config.json and chat_template.jinja: both match.
            files=(
                "config.json",
                "generation_config.json",
                "model*.safetensors*",
                "*processor_config.json",
                "tokenizer.json",
                "tokenizer_config.json",
                "chat_template.*",
            ),
            twin="datagen.models.twins.qwen:build_qwen_vl",
        ),
        ModelSource(
            "csd",
            "tomg-group-umd/CSD-ViT-L",
            "score: CSD style similarity",
            files=("pytorch_model.bin",),
            twin="datagen.models.twins.csd:build_csd",
        ),
        ModelSource(
            "dinov2",
            "facebook/dinov2-base",
            "score: DINOv2 structure",
            files=("config.json", "model.safetensors", "preprocessor_config.json"),
            twin="datagen.models.twins.dinov2:build_dinov2",
        ),
    )
}

# Lighter production alternatives a config may name instead of the default hub id.
ALTERNATIVES = {"wan_vace": ["Wan-AI/Wan2.1-VACE-1.3B-diffusers"]}


@dataclass(frozen=True)
class ResolvedModel:
    """A model ready to load: a local directory, the revision to record, and the weight variant
    its files carry (pass `variant=resolved.variant` to `from_pretrained`; None: plain names)."""

    key: str
    path: Path
    ref: ModelRef
    variant: str | None = None


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


# --- which files a directory holds ------------------------------------------------------------


def relative_files(root: Path) -> list[str]:
    """Every file under root (symlinks to files included, as in a hub snapshot), as relative
    POSIX paths, sorted."""
    found = []
    for folder, _, names in os.walk(root, followlinks=True):
        for name in names:
            path = Path(folder) / name
            if path.is_file():
                found.append(path.relative_to(root).as_posix())
    return sorted(found)


def matching(patterns: tuple[str, ...] | list[str], names: list[str]) -> list[str]:
    """The names that `hf download --include PATTERN...` would take (huggingface_hub's own
    matching: fnmatch, `*` crossing `/`)."""
    from huggingface_hub.utils import filter_repo_objects

    return list(filter_repo_objects(names, allow_patterns=list(patterns)))


def missing_files(root: Path, patterns: tuple[str, ...]) -> list[str]:
    """What `root` lacks for `patterns`: each pattern that matches no file (named as is), and
    each shard that a matched shard index lists but that is absent."""
    names = relative_files(root)
    missing = [p for p in patterns if not matching([p], names)]
    present = set(names)
    for index in matching(patterns, names):
        if not index.endswith(".json") or ".index." not in index.rpartition("/")[2]:
            continue
        try:
            weight_map = json.loads((root / index).read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as error:
            missing.append(f"{index} (unreadable: {error.__class__.__name__})")
            continue
        folder = index.rpartition("/")[0]
        for shard in sorted(set(weight_map.values())):
            name = f"{folder}/{shard}" if folder else shard
            if name not in present:
                missing.append(f"{name} (listed in {index})")
    return missing


# --- production ----------------------------------------------------------------------------


def _layouts(source: ModelSource) -> list[tuple[str | None, tuple[str, ...]]]:
    """The file sets a loader can read, preferred first: the variant files, then the plain."""
    layouts = [(source.variant, source.files)]
    if source.variant:
        layouts.append((None, source.plain_files))
    return layouts


def _pick_layout(source: ModelSource, root: Path) -> tuple[str | None, list[str]]:
    """(variant, []) for the first layout `root` holds completely, else (None, what the
    preferred layout lacks)."""
    first_missing: list[str] | None = None
    for variant, patterns in _layouts(source):
        missing = missing_files(root, patterns)
        if not missing:
            return variant, []
        if first_missing is None:
            first_missing = missing
    return None, first_missing or []


def _resolve_production(source: ModelSource, hub_id: str | None) -> ResolvedModel:
    local = os.environ.get(source.env)
    if local:
        path = Path(local)
        if not path.is_dir():
            raise MissingModelError(f"{source.key}: {source.env}={local} is not a directory")
        variant, missing = _pick_layout(source, path)
        if missing:
            raise MissingModelError(
                f"{source.key} ({source.purpose}): {source.env}={local} lacks {missing} "
                f"(no file matches). The hub files are fetched with:\n    "
                f"{source.download_command()}"
            )
        return ResolvedModel(
            source.key, path, ModelRef(str(path), directory_revision(path)), variant
        )
    repo = hub_id or source.hub_id
    command = source.download_command(repo)
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import IncompleteSnapshotError, LocalEntryNotFoundError

    problems = []
    for variant, patterns in _layouts(source):
        try:
            # allow_patterns: huggingface_hub checks a snapshot against the repository's cached
            # file listing, which after a `--include` download names files never fetched.
            snapshot = Path(
                snapshot_download(
                    repo,
                    local_files_only=True,
                    cache_dir=hf_cache_dir(),
                    allow_patterns=list(patterns),
                )
            )
        except IncompleteSnapshotError as error:
            # "...is incomplete: N file(s) are missing (a, b, ...). <why>": keep the list
            problems.append(str(error).split("). ")[0] + ")")
            continue
        except (LocalEntryNotFoundError, FileNotFoundError, OSError) as error:
            raise MissingModelError(
                f"{source.key} ({source.purpose}): {repo} is not in the local Hugging Face "
                f"cache ({error.__class__.__name__}). Fetch it with:\n    {command}\n"
                f"or point {source.env} at a local copy."
            ) from None
        missing = missing_files(snapshot, patterns)
        if not missing:
            return ResolvedModel(source.key, snapshot, ModelRef(repo, snapshot.name), variant)
        problems.append(f"{repo} is cached at {snapshot} but lacks {missing} (no file matches)")
    raise MissingModelError(
        f"{source.key} ({source.purpose}): {problems[0]}. Fetch them with:\n    {command}"
    )


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
                "variant": resolved.variant,
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


# --- twins in a Hugging Face hub cache -------------------------------------------------------


def twin_hub_files(key: str, twin_dir: Path) -> dict[str, Path]:
    """{name in the hub repository: twin file} for the twin of `key`: the files the production
    loader reads, under the production names (plain weight files renamed into the source's
    variant, e.g. unet/diffusion_pytorch_model.safetensors -> ...fp16.safetensors). Raises
    if the twin lacks a file the production check requires."""
    source = SOURCES[key]
    placed: dict[str, Path] = {}
    for name in relative_files(twin_dir):
        hub_name = name
        if source.variant and not matching(source.files, [name]):
            renamed = with_variant(name, source.variant)
            if matching(source.files, [renamed]):
                hub_name = renamed
        if matching(source.files, [hub_name]):
            placed[hub_name] = twin_dir / name
    # Check the placement as the production resolution will.
    staged = set(placed)
    lacking = [p for p in source.files if not matching([p], sorted(staged))]
    if lacking:
        raise RuntimeError(f"the {key} twin in {twin_dir} has no file for {lacking}")
    return placed


def install_twins_in_hub_cache(
    hub_cache: str | os.PathLike,
    tiny_dir: str | os.PathLike | None = None,
    keys: list[str] | tuple[str, ...] | None = None,
) -> dict[str, Path]:
    """Place the tiny twins in a Hugging Face hub cache under their production hub ids, in the
    cache's own layout, and return {key: snapshot directory}.

    `hub_cache` is the hub cache directory (`$HF_HOME/hub`, or `$HF_HUB_CACHE`). For each
    model: `models--<org>--<name>/blobs/<sha256>` holds each file's bytes,
    `snapshots/<commit>/<path>` links to its blob (relative symlinks, as huggingface_hub
    writes them), and `refs/main` holds the commit, a 40-hex digest of the placed files. Only
    the files the production loader reads are placed, under the production names
    (`twin_hub_files`), so `snapshot_download(local_files_only=True)`, `check_production()` and
    the production loaders (with `variant=resolved.variant`) find everything in the cache,
    offline. Twins are built (or reused) in `tiny_dir` (default: the tiny profile's dir).
    Placing again replaces the snapshot and its refs; nothing else in the cache changes.
    """
    hub_cache = Path(hub_cache)
    root = Path(tiny_dir) if tiny_dir else default_tiny_dir()
    unknown = [k for k in keys or () if k not in SOURCES]
    if unknown:
        raise KeyError(f"unknown model(s) {unknown}; known: {sorted(SOURCES)}")
    snapshots = {}
    for key in keys or list(SOURCES):
        source = SOURCES[key]
        files = twin_hub_files(key, build_twin(key, root).path)
        digests = {name: _file_sha256(path) for name, path in files.items()}
        listing = "".join(f"{name}\0{digests[name]}\n" for name in sorted(files))
        commit = hashlib.sha1(listing.encode()).hexdigest()
        repo = hub_cache / ("models--" + source.hub_id.replace("/", "--"))
        (repo / "blobs").mkdir(parents=True, exist_ok=True)
        snapshot = repo / "snapshots" / commit
        staging = repo / "snapshots" / f".{commit}.placing-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        for name, path in sorted(files.items()):
            blob = repo / "blobs" / digests[name]
            if not blob.exists():
                partial = blob.with_name(blob.name + ".incomplete")
                shutil.copyfile(path, partial)
                os.replace(partial, blob)
            link = staging / name
            link.parent.mkdir(parents=True, exist_ok=True)
            depth = len(Path("snapshots", commit, name).parts) - 1
            os.symlink(Path(*[".."] * depth, "blobs", digests[name]), link)
        shutil.rmtree(snapshot, ignore_errors=True)
        os.replace(staging, snapshot)
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / "main").write_text(commit)  # no newline, as huggingface_hub writes it
        snapshots[key] = snapshot
    return snapshots


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
