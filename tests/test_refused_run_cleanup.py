"""A training run refused once the base is loaded (``adapter.peft.target_modules`` naming
modules the base lacks) removes what it made and nothing else: the run folder, and a
registry folder it created by opening it; a registry that existed before keeps every file
and byte it had."""

from __future__ import annotations

from pathlib import Path

from test_bad_input import recipe, run_args, run_cli  # noqa: F401
from test_registry import META, make_adapter

from peftkit.registry import Registry
from peftkit.run.prepare import Made, first_missing, own_files

BAD_TARGET = "adapter.peft.target_modules=[nonexistent_mod]"


def _refused(argv, capsys) -> str:
    code, out, err = run_cli(argv, capsys)
    assert code == 1, (out, err)
    assert "'nonexistent_mod' matches no module" in err, err
    return err


def _snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every file's bytes and every folder (None) under ``folder``, by relative path."""
    return {
        str(p.relative_to(folder)): (None if p.is_dir() else p.read_bytes())
        for p in sorted(folder.rglob("*"))
    }


def test_a_registry_the_refused_run_created_goes_with_its_run_folder(
    recipe,  # noqa: F811
    tmp_path,
    capsys,
    reset_accelerate,
):
    reg = tmp_path / "new" / "deeper" / "reg"
    argv = [*run_args(recipe, BAD_TARGET)[:-1], reg]
    assert argv[-2] == "--registry"
    _refused(argv, capsys)
    assert not recipe["run"].exists()
    assert not (tmp_path / "new").exists()  # up to the outermost folder it made
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "r.yaml"]


def test_a_registry_that_existed_keeps_its_files_and_bytes(
    recipe,  # noqa: F811
    tmp_path,
    capsys,
    reset_accelerate,
):
    with Registry(recipe["reg"]) as registry:
        registry.register("kept", make_adapter(tmp_path / "src"), **META)
    before = _snapshot(recipe["reg"])
    _refused(run_args(recipe, BAD_TARGET), capsys)
    assert not recipe["run"].exists()
    assert _snapshot(recipe["reg"]) == before


def test_an_empty_registry_folder_that_existed_stays(
    recipe,  # noqa: F811
    capsys,
    reset_accelerate,
):
    """A folder given empty is made a registry by opening it, but the folder was not made
    by the run: it stays (with what opening wrote; the next run opens it as it is)."""
    recipe["reg"].mkdir()
    _refused(run_args(recipe, BAD_TARGET), capsys)
    assert recipe["reg"].is_dir() and not recipe["run"].exists()


def _new_registry(root: Path, top: Path | None = None) -> tuple[Made, tuple[str, ...]]:
    """A registry made at ``root`` as a run makes one: its files held, its folders listed."""
    top = top or first_missing(root)
    with Registry(root):
        pass
    files = {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}
    folders = tuple(str(p.relative_to(root)) for p in root.rglob("*") if p.is_dir())
    return Made(root, top, own_files(root, files), folders, whole=True), folders


def test_a_new_registry_holding_anything_else_is_left_whole(tmp_path):
    """Its index may record what another process registered meanwhile: a new registry
    goes only while it holds nothing but what opening it wrote."""
    root = tmp_path / "reg"
    top = first_missing(root)
    made, folders = _new_registry(root)
    files = {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}
    (root / "adapters" / "theirs").mkdir()
    made.remove()
    made.close()
    assert (root / "index.sqlite").is_file() and (root / "adapters" / "theirs").is_dir()
    (root / "adapters" / "theirs").rmdir()
    made = Made(root, top, own_files(root, files), folders, whole=True)
    made.remove()
    made.close()
    assert not root.exists() and tmp_path.exists()


def test_a_run_refused_for_a_run_folder_in_use_leaves_no_new_registry(
    recipe,  # noqa: F811
    tmp_path,
    capsys,
    reset_accelerate,
):
    """The registry opens before the run folder's lock is taken; when the lock is held by
    another run, the registry this run created goes, and the other run's folder stays."""
    from peftkit.run.folders import lock_run_dir

    reg = tmp_path / "fresh-reg"
    argv = [*run_args(recipe)[:-1], reg]
    with lock_run_dir(recipe["run"]):
        code, _, err = run_cli(argv, capsys)
        assert code == 1 and "is in use by another run" in err, err
        assert recipe["run"].is_dir()
    assert not reg.exists()


def test_folders_put_in_place_of_the_ones_a_new_registry_made_stay(tmp_path):
    """A user's folder moved in under a made subfolder's name, or a link to a user's folder
    put where the registry was, is not removed, even when it is empty."""
    root = tmp_path / "reg"
    made, folders = _new_registry(root)
    assert "adapters" in folders
    users = tmp_path / "users-empty-folder"
    users.mkdir()
    (root / "adapters").rmdir()
    users.rename(root / "adapters")  # another inode under a made folder's name
    made.remove()
    made.close()
    assert (root / "adapters").is_dir()  # theirs stays, and so does the registry root

    # the whole registry folder swapped for a link to a user's folder of the same shape
    root2 = tmp_path / "reg2"
    made, folders = _new_registry(root2)
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    for sub in folders:
        (theirs / sub).mkdir(parents=True, exist_ok=True)
    root2.rename(tmp_path / "moved-away")
    root2.symlink_to(theirs)
    made.remove()
    made.close()
    assert all((theirs / sub).is_dir() for sub in folders) and root2.is_symlink()
