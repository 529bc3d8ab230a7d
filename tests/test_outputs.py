"""gridtrain.outputs, the rule every writing command follows: an output path that holds something
is refused; --force replaces only a previous output of the same kind, never a source, a folder
inside one or a folder holding one; an output that cannot be created is refused before any work."""
import os

import pytest

from gridtrain.errors import UserError
from gridtrain.outputs import check_output, creatable, overlap


def export_kind(path):
    return None if (path / "config.json").exists() else "no config.json in it"


def test_overlap_with_a_source(tmp_path):
    source = tmp_path / "run" / "checkpoints"
    assert overlap(source, source) == "is"
    assert overlap(source / "step_00000004" / "hf", source) == "is inside"
    assert overlap(tmp_path / "run", source) == "holds"
    assert overlap(tmp_path / "run" / "export", source) is None  # a sibling: the control


def test_force_replaces_only_a_previous_output_of_the_same_kind(tmp_path):
    new, previous, other = tmp_path / "new", tmp_path / "previous", tmp_path / "other"
    previous.mkdir()
    (previous / "config.json").write_text("{}")
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    check_output(new, "--out", False, "model folder", export_kind)  # nothing there
    (tmp_path / "empty").mkdir()
    check_output(tmp_path / "empty", "--out", False, "model folder", export_kind)
    with pytest.raises(UserError, match=r"^--out .*previous: already exists and is not empty; choose a new path, "
                                        r"or pass --force to replace it if it is a previous model folder$"):
        check_output(previous, "--out", False, "model folder", export_kind)
    check_output(previous, "--out", True, "model folder", export_kind)  # --force, and it is one
    with pytest.raises(UserError, match=r"--force replaces only a previous model folder, and this is not one "
                                        r"\(no config.json in it\)"):
        check_output(other, "--out", True, "model folder", export_kind)


@pytest.mark.parametrize("relation", ["is", "is inside", "holds"])
def test_force_never_replaces_a_source(tmp_path, relation):
    source = tmp_path / "ckpts"
    source.mkdir()
    (source / "config.json").write_text("{}")  # looks like the kind: --force still refuses
    out = {"is": source, "is inside": source / "x", "holds": tmp_path}[relation]
    with pytest.raises(UserError, match=rf"^--out {out}: {relation} (the|a) source of this command"):
        check_output(out, "--out", True, "model folder", export_kind, sources=[source])


def test_an_output_that_cannot_be_created_is_refused(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="is a file, not a folder"):
        creatable(tmp_path / "file" / "sub" / "out.bin", "--output-prefix")
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    if os.geteuid() != 0:  # root writes anywhere: only the file case applies
        with pytest.raises(UserError, match="is not writable by this user"):
            creatable(locked / "out.bin", "--output-prefix")
    creatable(tmp_path / "new" / "deeper" / "out.bin", "--output-prefix")  # created later: fine
