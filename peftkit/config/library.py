"""The built-in YAML libraries: adapter presets, prompt sets and recipes, found by name.

One lookup for the three kinds: ``find("recipes", "sst2-lora")`` is the built-in file, and a
user's path is taken wherever a name is (``find("adapters", "my/preset.yaml")``); an unknown
name lists the built-in ones and the closest match. No torch import.

In a source checkout and in an installed wheel alike the files live in
``peftkit/library/<kind>/`` (the checkout's ``adapters/``, ``prompts/`` and ``recipes/``
link there).
"""

from __future__ import annotations

from pathlib import Path

from peftkit.errors import ConfigError, did_you_mean

_LIBRARY = Path(__file__).resolve().parent.parent / "library"
KINDS = {"adapters": "adapter preset", "prompts": "prompt set", "recipes": "recipe"}


def library_dir(kind: str) -> Path:
    """The built-in folder of ``kind`` (``"adapters"``, ``"prompts"`` or ``"recipes"``)."""
    if kind not in KINDS:
        raise ValueError(f"unknown library kind {kind!r}; one of {', '.join(KINDS)}")
    return _LIBRARY / kind


def available(kind: str, folder: Path | None = None) -> list[str]:
    """The names of the built-in files of ``kind`` (or of the YAML files in ``folder``)."""
    return sorted(p.stem for p in (folder or library_dir(kind)).glob("*.yaml"))


def find(kind: str, name_or_path: str | Path) -> Path:
    """A file of ``kind``: a user's path when it is one, else the built-in file of that name.

    >>> find("recipes", "quickstart").name
    'quickstart.yaml'
    """
    what = KINDS.get(kind, kind)
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    text = str(name_or_path)
    if path.suffix in (".yaml", ".yml") or "/" in text:
        if path.exists():  # there, but no regular file
            kind_of = "a folder" if path.is_dir() else "a device, pipe or socket"
            raise ConfigError(f"{what} file {str(path)!r} is {kind_of}, not a regular file")
        raise ConfigError(f"{what} file {str(path)!r} does not exist")
    candidate = library_dir(kind) / f"{text}.yaml"
    if candidate.is_file():
        return candidate
    names = available(kind)
    raise ConfigError(
        f"unknown {what} {text!r}; built-in {what}s: {', '.join(names)}, or give the path of a "
        ".yaml file" + did_you_mean(text, names)
    )
