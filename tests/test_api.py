"""The public API gives what docs/api.md says, whatever was imported before."""
import subprocess
import sys


def test_public_names_are_the_functions_even_after_their_submodules_are_imported():
    code = """
import vpn_dist.launch, vpn_dist.train, vpn_dist.evaluate, vpn_dist.data, vpn_dist.cli
from vpn_dist import Loader, RunConfig, evaluate, train
import vpn_dist
assert callable(train) and train.__module__ == "vpn_dist.launch", train
assert callable(evaluate) and evaluate.__module__ == "vpn_dist.evaluate", evaluate
assert RunConfig.__module__ == "vpn_dist.config" and Loader.__module__ == "vpn_dist.data"
assert vpn_dist.train is train and vpn_dist.evaluate is evaluate
assert "ray" not in sys.modules and "ffcv" not in sys.modules, "Ray and FFCV load only when a run starts"
"""
    result = subprocess.run([sys.executable, "-c", "import sys\n" + code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
