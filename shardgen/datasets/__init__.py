"""The converters, one module per dataset; each follows the contract in ``shardgen.base``."""

from __future__ import annotations

import importlib
from types import ModuleType

# The order of ``python -m shardgen --list``: the paper's 18 training sets, then the layouts users
# bring themselves, then the embedded default.
NAMES = (
    "cyto2",
    "nuclei",
    "tissuenet",
    "livecell",
    "omnipose",
    "yeaz",
    "deepbacs",
    "neurips22",
    "monuseg",
    "monusac",
    "cryonuseg",
    "nuinsseg",
    "bccd",
    "cpm",
    "tnbc",
    "lynsec",
    "ihc_tma",
    "conic",
    "pannuke",
    "folder",
    "cellpose_folder",
    "instance_pngs",
    "synthetic",
)


def get_converter(name: str) -> ModuleType:
    """The converter module called ``name``; ValueError listing the valid names otherwise."""
    if name not in NAMES:
        raise ValueError(f"unknown dataset {name!r}; choose one of: {', '.join(NAMES)} (python -m shardgen --list)")
    return importlib.import_module(f"shardgen.datasets.{name}")
