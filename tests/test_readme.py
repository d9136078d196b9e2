"""The Python API example (docs/api.md, linked from the README) runs as written and does what it says."""
import re
from pathlib import Path

API_DOC = Path(__file__).resolve().parents[1] / "docs" / "api.md"


def test_api_example_trains_one_step_and_predicts():
    text = API_DOC.read_text()
    section = text[text.index("# Python API"):]
    code = re.findall(r"```python\n(.*?)```", section, re.S)[0]
    scope: dict = {}
    exec(compile(code, "docs/api.md", "exec"), scope)
    assert scope["pred"].shape == (8,) and scope["plain"].shape == (8,)
    assert scope["loss"].item() > 0 and scope["sigma"].flatten(1).norm(dim=1).max() <= 10.0 + 1e-4
