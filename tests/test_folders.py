import pytest

from pipeline import folders


def test_atomic_output_dir_keeps_previous_output_when_writing_fails(tmp_path):
    out = tmp_path / "out"
    with folders.atomic_output_dir(out, "evaluate") as tmp:
        (tmp / "result.txt").write_text("first", encoding="utf-8")
    with pytest.raises(RuntimeError):
        with folders.atomic_output_dir(out, "evaluate") as tmp:
            (tmp / "result.txt").write_text("half", encoding="utf-8")
            raise RuntimeError("crash while writing")
    assert (out / "result.txt").read_text(encoding="utf-8") == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary folder left behind
