"""Video discovery: a class-per-folder tree (UCF101/HMDB51 style), a flat folder, or a
CSV manifest (path,label[,split]).

Each video gets a stable id: its path relative to the dataset root without the extension
(`wave/v_wave_01`). The id names its artifacts and its place in the output dataset, which
mirrors the input layout.
"""

from __future__ import annotations

import csv
from dataclasses import asdict, dataclass
from pathlib import Path

from pipeline.config import ConfigError
from pipeline.video import VIDEO_EXTENSIONS


@dataclass(frozen=True)
class VideoItem:
    id: str  # relative path without extension, posix separators
    path: Path  # absolute source path
    rel_path: str  # relative path with extension
    label: str | None = None
    split: str | None = None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["path"] = str(self.path)
        return d


def _is_inside(child: Path, parent: Path) -> bool:
    try:
        child.resolve().relative_to(parent.resolve())
        return True
    except ValueError:
        return False


def check_layout(input_path: Path, output: Path, workdir: Path) -> None:
    """Refuse layouts that would make the pipeline read its own outputs."""
    if not input_path.exists():
        raise ConfigError(f"run.input: {input_path} does not exist")
    root = input_path if input_path.is_dir() else input_path.parent
    for key, target in (("run.output", output), ("run.workdir", workdir)):
        if _is_inside(target, root):
            raise ConfigError(
                f"{key}: {target} is inside the input folder {root}; "
                "choose a folder outside it (outputs would be read as inputs)"
            )
        if _is_inside(root, target):
            raise ConfigError(f"{key}: {target} contains the input folder {root}")


def discover(input_path: Path) -> list[VideoItem]:
    input_path = Path(input_path)
    if not input_path.exists():
        raise ConfigError(f"run.input: {input_path} does not exist")
    if input_path.is_file():
        if input_path.suffix.lower() == ".csv":
            return _from_manifest(input_path)
        raise ConfigError(f"run.input: {input_path} is a file; give a folder or a .csv manifest")
    manifest = input_path / "manifest.csv"
    if manifest.is_file():
        return _from_manifest(manifest)
    return _from_folder(input_path)


def _from_folder(root: Path) -> list[VideoItem]:
    try:
        files = sorted(
            p
            for p in root.rglob("*")
            if p.suffix.lower() in VIDEO_EXTENSIONS
            and not any(part.startswith(".") for part in p.relative_to(root).parts)
            # Our own outputs, should someone point the input at an exported dataset.
            and not p.name.endswith((".mask.mp4", ".preview.mp4"))
        )
    except PermissionError as exc:
        raise ConfigError(f"run.input: cannot list {root}: {exc}") from exc
    items = []
    for p in files:
        rel = p.relative_to(root)
        # Class-per-folder: the first folder under the root is the label.
        label = rel.parts[0] if len(rel.parts) > 1 else None
        items.append(_item(root, rel, label, None))
    _check_unique(items)
    return items


def _item(root: Path, rel: Path, label: str | None, split: str | None) -> VideoItem:
    rel_posix = rel.as_posix()
    vid = rel.with_suffix("").as_posix()
    return VideoItem(id=vid, path=(root / rel).absolute(), rel_path=rel_posix, label=label,
                     split=split)


def _from_manifest(manifest: Path) -> list[VideoItem]:
    root = manifest.parent
    items = []
    with manifest.open(newline="") as fh:
        rows = list(csv.reader(fh))
    if rows and [c.strip().lower() for c in rows[0][:2]] == ["path", "label"]:
        rows = rows[1:]
    for lineno, row in enumerate(rows, start=1):
        if not row or not row[0].strip() or row[0].lstrip().startswith("#"):
            continue
        rel = Path(row[0].strip())
        if rel.is_absolute():
            try:
                rel = rel.relative_to(root)
            except ValueError as exc:
                raise ConfigError(
                    f"{manifest}:{lineno}: {rel} is outside the manifest's folder {root}"
                ) from exc
        if ".." in rel.parts:
            raise ConfigError(f"{manifest}:{lineno}: paths may not leave the manifest's folder")
        label = row[1].strip() or None if len(row) > 1 else None
        split = row[2].strip() or None if len(row) > 2 else None
        items.append(_item(root, rel, label, split))
    _check_unique(items)
    return items


def _check_unique(items: list[VideoItem]) -> None:
    seen: dict[str, str] = {}
    for it in items:
        if it.id in seen:
            raise ConfigError(
                f"run.input: {seen[it.id]} and {it.rel_path} would both be exported as "
                f"{it.id}.mp4; rename one"
            )
        seen[it.id] = it.rel_path
