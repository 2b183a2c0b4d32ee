"""``fastmax_hf.kernels`` from a source checkout that is not installed (fastmax_hf/checkout_kernels.py).

The subprocesses run ``python -S``: no site-packages processing, so no ``.pth`` file installs
the editable finder that ``pip install -e .`` left in this environment. The installed
dependencies (torch, transformers, triton) are put back on ``sys.path`` by hand, after the
checkout, so that only the checkout can provide ``fastmax_hf``.
"""

import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

from fastmax_hf import checkout_kernels

ROOT = Path(__file__).resolve().parents[1]


def run_uninstalled(code: str, pythonpath: Path, cwd: Path) -> subprocess.CompletedProcess:
    """``code`` in a fresh ``python -S`` with PYTHONPATH=``pythonpath``, the dependencies after it."""
    dependencies = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
    prelude = textwrap.dedent(
        f"""
        import sys
        sys.path.extend({dependencies!r})
        assert not any("editable" in repr(finder) for finder in sys.meta_path), sys.meta_path
        """
    )
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env["PYTHONPATH"] = str(pythonpath)
    env.setdefault("TRITON_INTERPRET", "1")  # importing the kernels needs no GPU either way
    return subprocess.run([sys.executable, "-S", "-c", prelude + textwrap.dedent(code)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_checkout_on_pythonpath_imports_its_own_kernels(tmp_path):
    done = run_uninstalled(
        """
        import fastmax_hf
        import fastmax_hf.kernels
        print(fastmax_hf.__file__)
        print(fastmax_hf.kernels.__file__)
        print(sys.modules["fastmax_hf.kernels.settings"].__file__)
        """,
        pythonpath=ROOT, cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    package, kernels, settings = done.stdout.split()[-3:]
    assert Path(package) == ROOT / "fastmax_hf" / "__init__.py"
    assert Path(kernels) == ROOT / "kernels" / "__init__.py"
    assert Path(settings) == ROOT / "kernels" / "settings.py"  # submodules come from the same folder


def test_package_without_its_kernels_says_how_to_install(tmp_path):
    shutil.copytree(ROOT / "fastmax_hf", tmp_path / "fastmax_hf", ignore=shutil.ignore_patterns("__pycache__"))
    done = run_uninstalled(
        """
        try:
            import fastmax_hf.kernels
        except ModuleNotFoundError as error:
            print("refused:", error)
        """,
        pythonpath=tmp_path, cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "refused:" in done.stdout and "pip install -e ." in done.stdout


def test_only_this_projects_tree_counts_as_a_checkout(tmp_path):
    assert checkout_kernels.is_checkout(ROOT)
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "__init__.py").write_text("")
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "kernels"\n')
    assert not checkout_kernels.is_checkout(tmp_path)  # e.g. another project's kernels beside site-packages
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "fastmax-hf"\n')
    assert checkout_kernels.is_checkout(tmp_path)


def test_the_finder_is_installed_once():
    checkout_kernels.install()  # as a second `import fastmax_hf` would
    assert sys.meta_path.count(checkout_kernels.CheckoutKernelsFinder) == 1
