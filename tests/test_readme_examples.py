"""Every code block of the README's "Using GSGD in your training code" section runs as it
stands."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def section_blocks() -> list[str]:
    text = README.read_text()
    start = text.index("## Using GSGD in your training code")
    end = text.index("\n## ", start + 1)
    return re.findall(r"```python\n(.*?)```", text[start:end], flags=re.S)


def test_the_section_has_examples():
    assert len(section_blocks()) >= 3


@pytest.mark.parametrize("index", range(len(section_blocks())))
def test_readme_example_runs(index):
    exec(compile(section_blocks()[index], f"README example {index}", "exec"), {})
