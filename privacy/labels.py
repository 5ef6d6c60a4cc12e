"""Ground-truth labels of the people in a generated dataset.

`avatarize sample-data` writes, next to each video, a JSON sidecar whose `person` entry
records who was filmed (identity, gender, age group, skin tone, build, ...). Attackers
read these labels for the ORIGINAL videos and try to predict them from an anonymized
version, so every leakage number is measured against the truth.

A video is named by its dataset id (its path relative to the dataset root without the
extension, as in pipeline.dataset), which is also its id in every anonymized output.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.config import ConfigError
from pipeline.dataset import discover

# Private attributes the attackers target; `identity` is closed-set re-identification.
ATTRIBUTES: tuple[str, ...] = ("identity", "gender", "age_group", "skin_tone", "build")


@dataclass(frozen=True)
class VideoLabels:
    id: str
    action: str | None
    split: str | None
    attributes: dict[str, str]
    repetition: int | None = None


@dataclass
class LabelTable:
    """Videos with their labels, and each attribute's classes in a fixed (sorted) order."""

    videos: list[VideoLabels]
    classes: dict[str, list[str]] = field(default_factory=dict)
    actions: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.classes:
            names = sorted({a for v in self.videos for a in v.attributes})
            self.classes = {a: sorted({v.attributes[a] for v in self.videos if a in v.attributes})
                            for a in names}
        if not self.actions:
            self.actions = sorted({v.action for v in self.videos if v.action is not None})

    def by_id(self) -> dict[str, VideoLabels]:
        return {v.id: v for v in self.videos}

    def split(self, name: str) -> list[VideoLabels]:
        return [v for v in self.videos if v.split == name]

    def encode(self, attribute: str, videos: list[VideoLabels]) -> list[int]:
        """Class indices of `attribute` for `videos`, in the table's class order."""
        index = {c: i for i, c in enumerate(self.classes[attribute])}
        return [index[v.attributes[attribute]] for v in videos]

    def encode_action(self, videos: list[VideoLabels]) -> list[int]:
        index = {c: i for i, c in enumerate(self.actions)}
        return [index[v.action] for v in videos]


def person_attributes(person: dict, attributes: tuple[str, ...] = ATTRIBUTES) -> dict[str, str]:
    out = {}
    for name in attributes:
        key = "id" if name == "identity" else name
        if key in person:
            out[name] = str(person[key])
    return out


def load_labels(dataset: Path, attributes: tuple[str, ...] = ATTRIBUTES) -> LabelTable:
    """Labels of every video of a generated dataset (folder with manifest.csv + sidecars).

    Raises ConfigError naming the first video whose sidecar is missing or has no `person`:
    leakage cannot be measured on data without ground truth."""
    dataset = Path(dataset)
    videos = []
    for item in discover(dataset):
        sidecar = dataset / f"{item.id}.json"
        if not sidecar.is_file():
            raise ConfigError(
                f"{item.rel_path}: no label file {sidecar.name}; privacy attackers need "
                "generated data with ground truth (avatarize sample-data --benchmark)"
            )
        try:
            meta = json.loads(sidecar.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"{sidecar}: unreadable label file: {exc}") from exc
        person = meta.get("person")
        if not isinstance(person, dict):
            raise ConfigError(f"{sidecar}: no 'person' entry")
        rep = meta.get("repetition")
        videos.append(VideoLabels(
            id=item.id,
            action=item.label or meta.get("action"),
            split=item.split or meta.get("split"),
            attributes=person_attributes(person, attributes),
            repetition=int(rep) if rep is not None else None,
        ))
    if not videos:
        raise ConfigError(f"{dataset}: no videos")
    return LabelTable(videos)
