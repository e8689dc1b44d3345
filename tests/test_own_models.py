"""docs/own-models.md ("Using the transforms in your own model") runs as written: every ```python block is one
test, executed in a fresh namespace (helpers shared with tests/test_api.py)."""
import pytest

from test_api import ROOT, python_blocks, run_block

PAGE = ROOT / "docs" / "own-models.md"
BLOCKS = python_blocks(PAGE)


@pytest.mark.parametrize("code, line", [(code, line) for _, line, code in BLOCKS], ids=[n for n, _, _ in BLOCKS])
def test_own_models_example_runs_as_written(code, line):
    run_block(code, f"{PAGE}:{line}")


def test_the_page_covers_linen_nnx_scanned_and_levanter_trees():
    text = PAGE.read_text(encoding="utf-8")
    for heading in ("## MaxText-style scanned stacks", "## levanter-style `weight` leaves", "## Shardings",
                    "## Back into your model: linen", "## Back into your model: nnx", "## Structured pruning"):
        assert heading in text
    assert len(BLOCKS) >= 4
