"""Where each stage's weights come from, for the two profiles.

- `production`: the real checkpoints, by hub id (read from the local HF cache, never downloaded
  at run time) or by a local directory given in the environment. A missing weight fails at
  setup with a message naming the model, the file pattern that matched nothing, and the
  command that fetches it.
- `tiny`: random-weight twins built offline from configs through the SAME library classes, saved
  in the same folder layouts, so the production loading code loads them unchanged. They live in
  one directory (`datagen models tiny DIR`, or built on first use).

Each model's source (its hub id and the files its production loader reads, the same list
that must be present and that the fetch command downloads) is defined in
datagen/models/sources.py and importable from here too; this module finds those files. A
source naming a variant ("fp16") resolves to a snapshot or local directory holding the variant
files, or else the plain ones (`ResolvedModel.variant` None). Loaders pass
`variant=resolved.variant` to `from_pretrained`.

`install_twins_in_hub_cache(hub_cache)` places every tiny twin in a Hugging Face hub cache
under its production hub id, with the file names the production loaders read (fp16 variant
names included), so a production build runs offline on twins kept where real weights live.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from datagen.core.files import file_lock
from datagen.core.stage import ModelRef
from datagen.models.sources import ALTERNATIVES as ALTERNATIVES
from datagen.models.sources import PROFILES as PROFILES
from datagen.models.sources import SDXL_FILES as SDXL_FILES
from datagen.models.sources import SOURCES as SOURCES
from datagen.models.sources import WAN_FILES as WAN_FILES
from datagen.models.sources import ModelSource as ModelSource
from datagen.models.sources import Profile as Profile
from datagen.models.sources import with_variant as with_variant

TWIN_MANIFEST = ".datagen-twin.json"
TINY_DIR_ENV = "DATAGEN_TINY_MODELS"
TINY_FORMAT = 2  # bump when a twin's config changes, so stale twins get rebuilt


class MissingModelError(RuntimeError):
    """A production weight is not available locally."""


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
    with file_lock(root / ".build.lock"):
        yield


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
