"""The CLI surface that the end-to-end tests do not cover: doctor, sample-data, usage."""

from __future__ import annotations

import pytest

from pipeline.cli import main


def test_doctor_passes_on_a_set_up_machine(capsys):
    # make test installs the EGL packages and the models ship in the wheels: all must pass.
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    for check in ("video codecs", "rendering (EGL)", "detector models", "body model cache",
                  "torch device"):
        assert f"[ ok ] {check}" in out


def test_doctor_reports_a_broken_renderer(monkeypatch, capsys):
    from pipeline import doctor

    def broken() -> str:
        raise RuntimeError("EGL offscreen rendering failed; install libegl1")

    monkeypatch.setattr(doctor, "CHECKS", [("rendering (EGL)", broken)])
    assert main(["doctor"]) == 1
    assert "[FAIL] rendering (EGL): EGL offscreen rendering failed" in capsys.readouterr().out


def test_sample_data_rejects_zero_videos(tmp_path, capsys):
    assert main(["sample-data", str(tmp_path / "s"), "--videos", "0"]) == 2
    assert "--videos" in capsys.readouterr().err


def test_usage_errors_exit_2():
    with pytest.raises(SystemExit) as exc:
        main(["run", "--no-such-flag"])
    assert exc.value.code == 2
