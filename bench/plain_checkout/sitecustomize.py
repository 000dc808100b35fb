"""On a plain checkout, maps kernels/ to rlhf_fast.kernels, as setup.py's package_dir does on install.

scripts/gpu_check.sh puts this folder (alone) on PYTHONPATH when `import rlhf_fast.kernels` does not
already resolve to this checkout's kernels/, i.e. when nobody ran `pip install -e .` here. Python
imports the first `sitecustomize` on sys.path once at start-up, so every process the check starts
(pytest and its workers, the benches, torch's compile workers) finds this checkout's rlhf_fast and
rlhf_fast.kernels from any working directory, and `kernels` never becomes a top-level package
through it. The sitecustomize this one shadows, if the Python has one, is run afterwards.
"""
import importlib.abc
import importlib.machinery
import importlib.util
import sys
from pathlib import Path

_HERE = Path(__file__).resolve().parent
_CHECKOUT = _HERE.parent.parent
PACKAGES = {"rlhf_fast": _CHECKOUT / "rlhf_fast", "rlhf_fast.kernels": _CHECKOUT / "kernels"}


class CheckoutFinder(importlib.abc.MetaPathFinder):
    """Finds the two packages at their checkout folders; their modules then load through each
    package's __path__ like any package's."""

    def find_spec(self, name, path=None, target=None):
        folder = PACKAGES.get(name)
        if folder is None:
            return None
        return importlib.util.spec_from_file_location(name, folder / "__init__.py",
                                                      submodule_search_locations=[str(folder)])


def _run_shadowed_sitecustomize() -> None:
    others = [entry for entry in sys.path if Path(entry or ".").resolve() != _HERE]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", others)
    if spec is not None and spec.loader is not None:
        spec.loader.exec_module(importlib.util.module_from_spec(spec))


sys.meta_path.insert(0, CheckoutFinder())
_run_shadowed_sitecustomize()
