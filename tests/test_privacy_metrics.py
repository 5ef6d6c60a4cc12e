import json

import numpy as np
import pytest

from pipeline.config import ConfigError
from privacy.labels import load_labels
from privacy.metrics import accuracy, average_precision, chance_level, cmap_f1, one_vs_rest


def test_average_precision_perfect_and_worst():
    pos = np.array([1, 1, 0, 0], bool)
    assert average_precision(np.array([0.9, 0.8, 0.2, 0.1]), pos) == 1.0
    # Positives ranked last: precision 1/3 and 2/4.
    worst = average_precision(np.array([0.1, 0.2, 0.8, 0.9]), pos)
    assert worst == pytest.approx((1 / 3 + 2 / 4) / 2)


def test_chance_is_majority_of_train():
    assert chance_level(np.array([0, 0, 1]), np.array([0, 1, 1, 1])) == 0.25
    assert accuracy(np.array([1, 1]), np.array([1, 0])) == 0.5


def test_cmap_f1_separates_informed_from_uninformed():
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 3, 300)
    informed = np.eye(3)[truth] * 0.8 + 0.1
    blind = np.full((300, 3), 1 / 3)
    good, bad = one_vs_rest(informed, truth), one_vs_rest(blind, truth)
    assert good == (1.0, 1.0)
    assert bad[0] < 0.5 and bad[1] == 0.0
    both = cmap_f1({"a": (informed, truth), "b": (blind, truth)})
    assert both["cmap"] == pytest.approx((1.0 + bad[0]) / 2)


def test_load_labels_reads_sidecars(tmp_path):
    (tmp_path / "wave").mkdir()
    rows = ["path,label,split"]
    for k, (pid, g) in enumerate([("p0", "male"), ("p1", "female")]):
        (tmp_path / "wave" / f"v{k}.mp4").write_bytes(b"")
        (tmp_path / "wave" / f"v{k}.json").write_text(json.dumps(
            {"person": {"id": pid, "gender": g, "build": "slim"}, "repetition": k}))
        rows.append(f"wave/v{k}.mp4,wave,{'train' if k == 0 else 'test'}")
    (tmp_path / "manifest.csv").write_text("\n".join(rows) + "\n")
    table = load_labels(tmp_path)
    assert table.classes["identity"] == ["p0", "p1"]
    assert table.encode("gender", table.split("test")) == [0]  # female sorts first
    assert table.by_id()["wave/v0"].repetition == 0
    (tmp_path / "wave" / "v1.json").unlink()
    with pytest.raises(ConfigError, match="v1.json"):
        load_labels(tmp_path)
