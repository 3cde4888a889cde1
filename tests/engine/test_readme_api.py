"""The README's Python API example runs as written."""
import re
from pathlib import Path


def test_readme_python_api_example_runs():
    text = (Path(__file__).parents[2] / "README.md").read_text()
    section = text[text.index("## Python API"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert scope["scores"].shape == (80,) and scope["G"].shape == (80, 32)
    assert scope["kept"].numel() == 32
