"""The README's examples run as written and produce what the README says they produce.

The first block is a sketch with a placeholder model name and is not run. In the others, a
line ``name = ...  # (2, 8, 4096, 64)`` states the shape of ``name``; the quickstart prints
the shape of what ``generate`` returns: the prompt's 300 tokens and the 20 new ones.
"""

import contextlib
import io
import re
from pathlib import Path

import torch

from fastmax_hf.integration import uses_recurrent_state

README = Path(__file__).resolve().parents[1] / "README.md"
EXAMPLES = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
# `name = ...  # (2, 8, 4096, 64)...`: the README's statement of a result's shape
SHAPE_COMMENT = re.compile(r"^(\w+) = .*#\s*\((\d+(?:,\s*\d+)*)\)", re.MULTILINE)


def run_example(index):
    """(the names the example defined, what it printed), from a fixed random state: the
    quickstart's model has random weights, whatever the tests before it drew."""
    torch.manual_seed(0)
    namespace = {}
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(EXAMPLES[index], f"README.md example {index}", "exec"), namespace)
    return namespace, printed.getvalue()


def stated_shapes(example):
    """name -> shape, for every ``name = ...  # (a, b, ...)`` line of the example."""
    return {name: tuple(int(n) for n in dims.split(",")) for name, dims in SHAPE_COMMENT.findall(example)}


def test_the_readme_has_its_examples():
    assert len(EXAMPLES) == 3
    assert "from_pretrained(name" in EXAMPLES[0]
    assert "generate(" in EXAMPLES[1] and "FASTMultiHeadAttention" in EXAMPLES[2]


def test_quickstart_produces_what_it_says():
    namespace, printed = run_example(1)
    shapes = stated_shapes(EXAMPLES[1])
    assert "o" in shapes  # "# (2, 8, 4096, 64), linear time and memory" on the fastmax call
    for name, shape in shapes.items():
        assert tuple(namespace[name].shape) == shape, name
    assert torch.isfinite(namespace["o"]).all()
    # generate() returns the 300 prompt tokens followed by max_new_tokens=20 new ones
    assert printed.strip() == "torch.Size([1, 320])", printed
    assert torch.equal(namespace["out"][:, :300], namespace["prompt"])
    # "generation used a FastmaxCache": generate() builds one for models whose attention keeps a state
    assert uses_recurrent_state(namespace["model"])


def test_seed_example_returns_attention_shaped_like_its_input():
    namespace, printed = run_example(2)
    assert printed == ""
    x, o = namespace["x"], namespace["o"]
    assert x.dim() == 3  # "(B*H, N, D) or (B, H, N, D)", as the comment on x says
    assert o.shape == x.shape and o.dtype == x.dtype and torch.isfinite(o).all()
    for name, shape in stated_shapes(EXAMPLES[2]).items():
        assert tuple(namespace[name].shape) == shape, name
