"""The README's examples run as written (the first block is a sketch with a placeholder model name)."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
EXAMPLES = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def test_the_readme_has_its_examples():
    assert len(EXAMPLES) == 3
    assert "from_pretrained(name" in EXAMPLES[0]


@pytest.mark.parametrize("index", range(1, len(EXAMPLES)))
def test_readme_example_runs(index):
    exec(compile(EXAMPLES[index], f"README.md example {index}", "exec"), {})
