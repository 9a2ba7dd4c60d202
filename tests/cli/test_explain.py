"""`netdoctor explain`: prints a rule's doc (rules/NDxxx.md), found in a checkout or in the
installed package (rules/ ships as netdoctor/rule_docs)."""

from __future__ import annotations

import sys
import textwrap

from conftest import RULE_DOCS, invoke
from netdoctor import docs


def _doc(rule_id: str) -> str:
    return (RULE_DOCS / f"{rule_id}.md").read_text(encoding="utf-8")


def test_explain_prints_the_doc():
    result = invoke("explain", "ND101")
    assert result.exit_code == 0
    assert result.stdout.strip() == _doc("ND101").strip()
    # Rules are also found by name, case-insensitively.
    assert invoke("explain", "deep-plain-stack").stdout == result.stdout
    assert invoke("explain", "nd101").stdout == result.stdout


def test_explain_unknown_rule_is_a_usage_error():
    result = invoke("explain", "ND999")
    assert result.exit_code == 2
    assert result.stderr.startswith("netdoctor: error: unknown rule 'ND999'")


def test_docs_found_in_a_checkout():
    assert docs.docs_dir() == RULE_DOCS
    assert docs.read_doc("ND101") == _doc("ND101")


def test_docs_found_in_an_installed_package(tmp_path, monkeypatch):
    """A wheel ships rules/ as netdoctor/rule_docs (pyproject force-include); docs.py prefers it."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib
    pyproject = tomllib.loads((RULE_DOCS.parent / "pyproject.toml").read_text(encoding="utf-8"))
    include = pyproject["tool"]["hatch"]["build"]["targets"]["wheel"]["force-include"]
    assert include.get("rules") == "netdoctor/rule_docs"

    package = tmp_path / "site-packages" / "netdoctor"
    (package / "rule_docs").mkdir(parents=True)
    (package / "rule_docs" / "ND101.md").write_text("# ND101 shipped copy\n", encoding="utf-8")
    monkeypatch.setattr(docs, "__file__", str(package / "docs.py"))
    assert docs.docs_dir() == package / "rule_docs"
    assert docs.read_doc("ND101") == "# ND101 shipped copy\n"
    assert docs.read_doc("ND102") is None
    result = invoke("explain", "ND101")
    assert result.exit_code == 0 and result.stdout.strip() == "# ND101 shipped copy"


def test_examples_helper_reads_first_block_of_each_section():
    text = textwrap.dedent("""\
        # ND999 x

        ## Example
        prose
        ```python
        bad = 1
        ```
        ```python
        ignored = 1
        ```
        ## Fix
        ```python
        good = 1
        ```
        ## Options
        None.
        """)
    assert docs.examples(text) == {"bad": "bad = 1\n", "good": "good = 1\n"}
