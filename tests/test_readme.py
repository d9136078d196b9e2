"""The README's Python API example runs as written and does what it says."""
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_api_example_trains_one_step_and_predicts():
    text = README.read_text()
    section = text[text.index("## Python API"):]
    code = re.findall(r"```python\n(.*?)```", section, re.S)[0]
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert scope["pred"].shape == (8,) and scope["plain"].shape == (8,)
    assert scope["loss"].item() > 0 and scope["sigma"].flatten(1).norm(dim=1).max() <= 10.0 + 1e-4
