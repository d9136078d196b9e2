"""The public API gives what docs/api.md says, whatever was imported before."""
import pkgutil
import subprocess
import sys

import pytest

import vpn_dist


def test_public_names_are_the_functions_whatever_was_imported_before():
    code = """
import vpn_dist.launch, vpn_dist.trainer, vpn_dist.evaluation, vpn_dist.data, vpn_dist.cli
from vpn_dist import Loader, RunConfig, evaluate, train
import vpn_dist
assert callable(train) and train.__module__ == "vpn_dist.launch", train
assert callable(evaluate) and evaluate.__module__ == "vpn_dist.evaluation", evaluate
assert RunConfig.__module__ == "vpn_dist.config" and Loader.__module__ == "vpn_dist.data"
assert vpn_dist.train is train and vpn_dist.evaluate is evaluate
assert "ray" not in sys.modules and "ffcv" not in sys.modules, "Ray and FFCV load only when a run starts"
"""
    result = subprocess.run([sys.executable, "-c", "import sys\n" + code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_no_public_name_is_also_a_submodule():
    """A submodule named like a public function would replace it as the package's attribute once imported."""
    submodules = {module.name for module in pkgutil.iter_modules(vpn_dist.__path__)}
    assert not submodules & set(vpn_dist.__all__), submodules & set(vpn_dist.__all__)


def test_the_sweep_report_imports_neither_the_trainer_nor_ray():
    code = ("import sys, vpn_dist.sweep.report\n"
            "loaded = {'vpn_dist.trainer', 'vpn_dist.launch', 'ray'} & set(sys.modules)\n"
            "assert not loaded, loaded")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
