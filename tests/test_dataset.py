import pytest

from pipeline.config import ConfigError
from pipeline.dataset import check_layout, discover


def touch(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")


def test_class_per_folder(tmp_path):
    for rel in ["wave/a.avi", "wave/b.mp4", "squat/c.mkv", "squat/notes.txt"]:
        touch(tmp_path / rel)
    items = discover(tmp_path)
    assert [(i.id, i.label) for i in items] == [
        ("squat/c", "squat"), ("wave/a", "wave"), ("wave/b", "wave")]
    assert items[0].path == tmp_path / "squat/c.mkv"


def test_flat_folder_has_no_labels_and_skips_own_outputs(tmp_path):
    for rel in ["a.mp4", "b.gif", "b2.mask.mp4", "c.preview.mp4", ".hidden/d.mp4"]:
        touch(tmp_path / rel)
    items = discover(tmp_path)
    assert [(i.id, i.label) for i in items] == [("a", None), ("b", None)]


def test_manifest(tmp_path):
    touch(tmp_path / "v/x.mp4")
    touch(tmp_path / "y.webm")
    (tmp_path / "list.csv").write_text("path,label,split\nv/x.mp4,jump,train\ny.webm,run,test\n")
    items = discover(tmp_path / "list.csv")
    assert [(i.id, i.label, i.split) for i in items] == [
        ("v/x", "jump", "train"), ("y", "run", "test")]


def test_manifest_rejects_escaping_paths(tmp_path):
    (tmp_path / "list.csv").write_text("../x.mp4,jump\n")
    with pytest.raises(ConfigError, match="may not leave"):
        discover(tmp_path / "list.csv")


def test_duplicate_ids_are_a_config_error(tmp_path):
    touch(tmp_path / "a.mp4")
    touch(tmp_path / "a.avi")
    with pytest.raises(ConfigError, match="both be exported"):
        discover(tmp_path)


def test_missing_input(tmp_path):
    with pytest.raises(ConfigError, match="run.input"):
        discover(tmp_path / "nope")


def test_output_inside_input_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="run.output: .* inside the input folder"):
        check_layout(tmp_path, tmp_path / "out", tmp_path.parent / "work")
    (tmp_path / "in").mkdir()
    check_layout(tmp_path / "in", tmp_path / "out", tmp_path / "work")
