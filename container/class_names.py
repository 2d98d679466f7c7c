"""Class names from ImageFolder folder names, torch-free so that `launch` can share it with `train`:
the labels `serve` returns and the folders of a batch transform's inputs must map the same way."""

from __future__ import annotations

import re

__all__ = ["class_name"]

_FOLDER_PREFIX = re.compile(r"^\d+[._\-\s]+")


def class_name(folder: str) -> str:
    """`001.Affenpinscher` -> `Affenpinscher`, `043.Canaan_dog` -> `Canaan dog`."""
    name = _FOLDER_PREFIX.sub("", folder).replace("_", " ").strip()
    return name or folder
