"""Every bad input of tests/bad_inputs.py gives one line naming what is wrong and what was expected, exit 2."""
from pathlib import Path

import pytest

from bad_inputs import CASES, Context, run_case

DOCS = Path(__file__).resolve().parent.parent / "docs" / "bad_inputs.md"


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    return Context(tmp_path_factory.mktemp("bad") / "cases").make()


@pytest.mark.parametrize("case,argv,expected", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gives_one_clear_line(ctx, case, argv, expected):
    code, err = run_case(ctx, argv)
    assert code == 2, f"{case}: exit {code}, stderr {err!r}"
    assert err.count("\n") == 1 and err.startswith("llamavit: "), f"{case}: not one line: {err!r}"
    assert "Traceback" not in err and expected in err, f"{case}: {err!r}"
    assert "weights_only=False" not in err   # we never advise unpickling arbitrary objects


def test_the_docs_table_lists_every_case():
    table = DOCS.read_text()
    for case, _, expected in CASES:
        row = next((line for line in table.splitlines() if line.startswith(f"| {case} |")), None)
        assert row is not None, f"docs/bad_inputs.md lacks the case {case!r}: run `python tests/bad_inputs.py`"
        assert expected.replace("|", "/") in row, f"docs/bad_inputs.md is stale for {case!r}"
