"""The documentation: the configuration reference is regenerated from the schema and must equal the committed
page, and the MkDocs site builds with --strict (a broken link or anchor between pages fails)."""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
from pathlib import Path

from mllmfl_dist.config import Config, flat_items, reference

REPO = Path(__file__).resolve().parents[1]
REGENERATE = "python -m mllmfl_dist.config.reference --write"


def test_the_committed_configuration_reference_is_the_schema_s():
    committed = (REPO / "docs" / "reference" / "configuration.md").read_text()
    assert committed == reference.render(), (
        f"docs/reference/configuration.md differs from the config schema; regenerate it with `{REGENERATE}`"
    )


def test_the_reference_has_a_row_for_every_key_with_its_default_and_what_it_allows():
    page = reference.render()
    tables = {name: text for name, text in (part.split("]`", 1) for part in page.split("\n## `[")[1:])}
    for key, value in flat_items(Config().to_dict()).items():
        section, name = key.rsplit(".", 1)
        row = next((line for line in tables[section].splitlines() if line.startswith(f"| `{name}` |")), None)
        assert row is not None, key
        assert f"`{reference._toml_value(value)}`" in row, (key, row)
    # Choices and bounds come from the fields' metadata; a comment beside the field becomes its description.
    assert '| `backend` | str | `"auto"` | `"auto"`, `"gloo"`, `"nccl"` | auto: nccl when CUDA is available' in page
    assert "| `threads` | int | `1` | an integer &gt;= 1 | intra-op threads per process" in page
    assert "## `[pretrain.deepspeed]`" in page and "## `[creff]`" in page


def test_comments_above_and_beside_a_field_are_its_description():
    @dataclasses.dataclass(frozen=True)
    class Options:
        """[options]"""

        # first line above
        # second line above
        width: int = 3  # beside it; a '#' in "a string # here" is not one
        plain: str = "x # not a comment"

    comments = reference.field_comments(Options)
    assert comments["width"] == "first line above second line above beside it; a '#' in \"a string # here\" is not one"
    assert comments["plain"] == ""


def test_the_generator_runs_without_torch_and_check_names_the_command(tmp_path):
    code = (
        "import sys, mllmfl_dist.config.reference as r; page = r.render(); "
        "assert 'torch' not in sys.modules, 'torch imported'; print(len(page))"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    check = subprocess.run(
        [sys.executable, "-m", "mllmfl_dist.config.reference", "--check"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert check.returncode == 0, check.stderr


def test_the_check_fails_naming_the_command_when_the_page_is_stale(tmp_path, monkeypatch, capsys):
    stale = tmp_path / "configuration.md"
    stale.write_text(reference.render().replace("| `threads` |", "| `thread_count` |"))
    monkeypatch.setattr(reference, "PAGE", stale)
    assert reference.main(["--check"]) == 1
    assert REGENERATE in capsys.readouterr().err
    assert reference.main(["--write"]) == 0 and stale.read_text() == reference.render()
    assert reference.main(["--check"]) == 0


def test_the_site_builds_strict(tmp_path):
    # MkDocs is a declared test dependency (pyproject's [docs] extra, in [dev]): absent, this fails, not skips.
    try:
        import material  # noqa: F401  (the Material theme mkdocs.yml names)
        import mkdocs  # noqa: F401
    except ImportError as missing:
        raise AssertionError(
            f"{missing.name} is not installed: pip install -e '.[docs]' (launch/test.sh does)"
        ) from None
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert (tmp_path / "site" / "reference" / "configuration" / "index.html").is_file()


def test_a_broken_link_or_anchor_fails_the_strict_build(tmp_path):
    shutil.copytree(REPO / "docs", tmp_path / "docs")
    shutil.copy(REPO / "mkdocs.yml", tmp_path / "mkdocs.yml")
    with open(tmp_path / "docs" / "index.md", "a") as page:
        page.write("\n[gone](how-to/no-such-page.md), [no anchor](reference/cli.md#no-such-heading)\n")
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert done.returncode != 0
    assert "no-such-page.md" in done.stderr and "#no-such-heading" in done.stderr, done.stderr[-4000:]


def test_the_docs_name_no_path_outside_the_repository():
    pages = [REPO / "README.md", REPO / "mkdocs.yml", *sorted((REPO / "docs").rglob("*.md"))]
    outside = "/".join(("..", "shared"))  # spelled in parts so the repository holds no such path itself
    assert [p.name for p in pages if outside in p.read_text()] == []
