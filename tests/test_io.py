"""The shared file-safety primitives: atomic file write, folder publish, JSON-lines reading."""

import os

import pytest

from preftune.io import JsonlError, atomic_write, building_dir, iter_jsonl, publish_dir


def test_atomic_write_failure_midway_keeps_old_content_and_leaves_no_temp(tmp_path):
    path = tmp_path / "f.txt"
    path.write_text("old\n")

    def half_then_fail(tmp):
        tmp.write_text("half of the new")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        atomic_write(path, half_then_fail)
    assert path.read_text() == "old\n"
    assert os.listdir(tmp_path) == ["f.txt"]

    atomic_write(path, lambda tmp: tmp.write_text("new\n"))
    assert path.read_text() == "new\n"
    assert os.listdir(tmp_path) == ["f.txt"]


def test_atomic_write_uses_the_given_temp_name_and_umask_mode(tmp_path):
    seen = []
    atomic_write(tmp_path / "latest", lambda tmp: seen.append(tmp.name) or tmp.write_text("x"),
                 tmp=tmp_path / ".latest.tmp")
    assert seen == [".latest.tmp"]
    mask = os.umask(0)
    os.umask(mask)
    (tmp_path / "g").write_text("")  # what a plain write gives
    atomic_write(tmp_path / "f", lambda tmp: tmp.write_text("y"))
    assert (tmp_path / "f").stat().st_mode == (tmp_path / "g").stat().st_mode
    assert sorted(os.listdir(tmp_path)) == ["f", "g", "latest"]


def test_building_dir_replaces_an_existing_folder_or_keeps_it_on_error(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "a").write_text("old")
    with pytest.raises(RuntimeError), building_dir(target) as tmp:
        (tmp / "a").write_text("half")
        raise RuntimeError("crash")
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert (target / "a").read_text() == "old"

    with building_dir(target) as tmp:
        assert tmp.name.startswith(".out.") and tmp.name.endswith(".partial")
        (tmp / "b").write_text("new")
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert [p.name for p in target.iterdir()] == ["b"]


def test_publish_dir_into_a_new_place(tmp_path):
    new = tmp_path / ".x.tmp"
    (new / "sub").mkdir(parents=True)
    (new / "sub" / "f").write_text("1")
    publish_dir(new, tmp_path / "x")
    assert (tmp_path / "x" / "sub" / "f").read_text() == "1"
    assert [p.name for p in tmp_path.iterdir()] == ["x"]


def write(tmp_path, data: bytes):
    path = tmp_path / "log.jsonl"
    path.write_bytes(data)
    return path


def test_lenient_drops_only_a_cut_last_line(tmp_path):
    path = write(tmp_path, b'{"a": 1}\n\n{"a": 2}\n{"a": 3, "b": "x\xe2\x80')
    cut = []
    assert list(iter_jsonl(path, lenient=True, on_cut=cut.append)) == [(1, {"a": 1}),
                                                                       (3, {"a": 2})]
    assert cut == [4]


def test_strict_names_file_and_line_of_a_cut_last_line(tmp_path):
    path = write(tmp_path, b'{"a": 1}\n{"a": 2')
    with pytest.raises(JsonlError) as e:
        list(iter_jsonl(path))
    assert str(e.value) == f"{path}:2: invalid JSON: Expecting ',' delimiter (column 8)"


@pytest.mark.parametrize("lenient", [False, True])
def test_damaged_middle_line_is_an_error_in_both_modes(tmp_path, lenient):
    path = write(tmp_path, b'{"a": 1}\n{"a": \xff}\n{"a": 3}')

    def error(line, problem):
        return ValueError(f"line {line}: {problem}")

    with pytest.raises(ValueError, match=r"^line 2: not UTF-8 \(invalid start byte\)$"):
        list(iter_jsonl(path, lenient=lenient, error=error))
