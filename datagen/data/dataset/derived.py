"""Datasets derived from another (filter, review finalize): a safe OUT, made all or nothing.

The derived dataset is written to a staging directory and renamed to OUT when finished, so OUT
holds the old dataset or the new one, never a mix; the source dataset is never touched.
"""

from __future__ import annotations

import os
from pathlib import Path


def check_output_dir(
    source: Path, out_dir: Path, overwrite: bool, label: str, error: type[Exception]
) -> None:
    """Refuse an OUT that could touch the source dataset or clobber data: OUT equal to,
    inside or containing the source, an OUT that is a file, a non-empty OUT without
    `overwrite`. `label` names the source in messages (IN, SFT_DIR)."""
    source_path, target = source.resolve(), out_dir.resolve()
    if target == source_path:
        raise error(f"OUT {out_dir} is {label}; {label} is never modified")
    if source_path in target.parents:
        raise error(f"OUT {out_dir} is inside {label} {source}; choose a directory outside it")
    if target in source_path.parents:
        raise error(f"OUT {out_dir} contains {label} {source}; choose another directory")
    if target.exists():
        if not target.is_dir():
            raise error(f"OUT {out_dir} exists and is not a directory")
        if any(target.iterdir()) and not overwrite:
            raise error(f"OUT {out_dir} is not empty; pass --overwrite to replace it")


def move_into_place(staging: Path, out_dir: Path) -> None:
    """Rename a finished staging directory to OUT (all or nothing), replacing an existing OUT
    last."""
    import shutil

    if out_dir.exists():
        if not any(out_dir.iterdir()):
            out_dir.rmdir()
        else:
            retired = out_dir.parent / f".{out_dir.name}.datagen-old-{os.getpid()}"
            os.replace(out_dir, retired)
            os.replace(staging, out_dir)
            shutil.rmtree(retired)
            return
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    os.replace(staging, out_dir)
