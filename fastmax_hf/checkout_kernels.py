"""``fastmax_hf.kernels`` from a source checkout that is not installed.

The Triton kernels live in the repository's top-level ``kernels/`` folder, beside the
``fastmax_hf/`` package folder. Installing the package (``pip install -e .`` or a wheel) ships
them as ``fastmax_hf.kernels``: pyproject.toml maps that package name to the folder
``kernels``. A checkout put on ``sys.path`` by hand (``PYTHONPATH=<repo root>``) has no
``fastmax_hf/kernels/`` folder, so the plain import system cannot find them.

``import fastmax_hf`` therefore puts ``CheckoutKernelsFinder`` first on ``sys.meta_path``. It
answers for the one name ``fastmax_hf.kernels``, and pairs the kernels with the ``fastmax_hf``
that was imported:

- an installed package (``fastmax_hf/kernels/`` exists): left to the ordinary import;
- a checkout (the folder above ``fastmax_hf/`` holds this project's pyproject.toml and
  ``kernels/``): that ``kernels/`` folder. An editable install is such a checkout; and a second
  checkout on PYTHONPATH gets its own kernels, not those of the one installed in editable mode;
- a package read from an archive (no folder on disk): left to that archive's importer;
- otherwise: a ModuleNotFoundError that says how to install.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

KERNELS_MODULE = "fastmax_hf.kernels"
PACKAGE_DIR = Path(__file__).resolve().parent  # .../fastmax_hf
CHECKOUT_ROOT = PACKAGE_DIR.parent
CHECKOUT_KERNELS_DIR = CHECKOUT_ROOT / "kernels"

_PROJECT_NAME = re.compile(r'^name\s*=\s*"fastmax-hf"\s*$', re.MULTILINE)


def is_checkout(root: Path = CHECKOUT_ROOT) -> bool:
    """Whether ``root`` is this project's source tree: its pyproject.toml names fastmax-hf and it
    has ``kernels/``. (A ``kernels`` folder beside an installed package may be another project.)"""
    pyproject = root / "pyproject.toml"
    if not (pyproject.is_file() and (root / "kernels" / "__init__.py").is_file()):
        return False
    return _PROJECT_NAME.search(pyproject.read_text(encoding="utf-8")) is not None


class CheckoutKernelsFinder:
    """A meta path finder for the one name ``fastmax_hf.kernels`` (see the module docstring)."""

    @classmethod
    def find_spec(cls, fullname, path=None, target=None):
        if fullname != KERNELS_MODULE:
            return None
        if (PACKAGE_DIR / "kernels" / "__init__.py").is_file() or not PACKAGE_DIR.is_dir():
            return None  # installed with its kernels, or inside an archive: the ordinary import finds them
        if not is_checkout():
            raise ModuleNotFoundError(
                f"No module named {KERNELS_MODULE!r}: fastmax_hf at {PACKAGE_DIR} is neither installed with its "
                "kernels nor part of a source checkout with a kernels/ folder. Install the package from the "
                "repository root with `pip install -e .` (pyproject.toml maps fastmax_hf.kernels to kernels/).",
                name=KERNELS_MODULE,
            )
        return importlib.util.spec_from_file_location(
            KERNELS_MODULE, CHECKOUT_KERNELS_DIR / "__init__.py",
            submodule_search_locations=[str(CHECKOUT_KERNELS_DIR)],
        )


def install() -> None:
    """Put the finder first on ``sys.meta_path``, once (importing fastmax_hf again adds nothing)."""
    if CheckoutKernelsFinder not in sys.meta_path:
        sys.meta_path.insert(0, CheckoutKernelsFinder)
