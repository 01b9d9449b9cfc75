"""The README and docs/ pages hold together: every relative link and anchor resolves inside the repository,
every repository path and `tuner.*` name they mention exists, the README stays one page and lists every
command. Pages move and modules get reorganised; these checks catch the references left behind."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import typer.main

from tuner.cli import app

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
PAGES = [README, *sorted((REPO / "docs").rglob("*.md"))]
README_MAX_LINES = 250

FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.M | re.S)
INLINE_CODE = re.compile(r"`[^`\n]+`")
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^ {0,3}#{1,6}\s+(.+?)\s*#*\s*$", re.M)
EXTERNAL = re.compile(r"^[a-z][a-z0-9+.-]*:", re.I)  # http:, https:, mailto: ...
REPO_PATH = re.compile(r"`((?:tuner|tests|docs|search_spaces|dashboard|\.ci)/[\w./-]*)`")
TUNER_NAME = re.compile(r"(?<![\w./-])tuner(?:\.[A-Za-z_]\w*)+")


def _page_id(page: Path) -> str:
    return str(page.relative_to(REPO))


def _without_code(text: str) -> str:
    """The page's prose: fenced blocks blanked (line count kept) and inline code spans removed."""
    text = FENCE.sub(lambda m: "\n" * m.group().count("\n"), text)
    return INLINE_CODE.sub("", text)


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: its text without markup, lower case, punctuation dropped, spaces as -."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)   # a link in a heading anchors by its text
    text = re.sub(r"[`*]", "", text).strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """Every heading anchor of a page, with GitHub's -1, -2 ... suffixes for repeated headings."""
    seen: dict[str, int] = {}
    found = set()
    prose = FENCE.sub("", page.read_text(encoding="utf-8"))
    for heading in HEADING.findall(prose):
        slug = github_slug(heading)
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        found.add(slug if count == 0 else f"{slug}-{count}")
    return found


def link_problems(page: Path, repo: Path = REPO) -> list[str]:
    """What is wrong with each link of a page: a missing file or heading, or a target outside the repository."""
    problems = []
    for target in LINK.findall(_without_code(page.read_text(encoding="utf-8"))):
        if EXTERNAL.match(target):
            continue
        path_part, _, anchor = target.partition("#")
        if path_part.startswith("/"):
            problems.append(f"{target}: an absolute path, not a link inside the repository")
            continue
        resolved = (page.parent / path_part).resolve() if path_part else page
        if not resolved.is_relative_to(repo):
            problems.append(f"{target}: leaves the repository")
        elif not resolved.exists():
            problems.append(f"{target}: no such file")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            problems.append(f"{target}: no heading with anchor #{anchor} in {resolved.relative_to(repo)}")
    return problems


def _module_file(dotted: str) -> Path | None:
    path = REPO.joinpath(*dotted.split("."))
    if (path / "__init__.py").is_file():
        return path / "__init__.py"
    return path.with_suffix(".py") if path.with_suffix(".py").is_file() else None


def _top_level_names(source: Path) -> set[str]:
    """Names a module defines or imports at top level, plus `__all__` (for lazily loaded public names)."""
    tree = ast.parse(source.read_text(encoding="utf-8"))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((alias.asname or alias.name).split(".")[0] for alias in node.names)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(t.id for t in targets if isinstance(t, ast.Name))
            if any(isinstance(t, ast.Name) and t.id == "__all__" for t in targets) and node.value is not None:
                names.update(ast.literal_eval(node.value))
    return names


def unknown_tuner_name(dotted: str) -> str | None:
    """Why `tuner.a.b.c` names nothing (the longest module prefix lacks the next name), or None if it resolves."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        module = _module_file(".".join(parts[:cut]))
        if module is None:
            continue
        if cut == len(parts) or parts[cut] in _top_level_names(module):
            return None
        return f"{dotted}: {'.'.join(parts[:cut])} defines no {parts[cut]!r}"
    return f"{dotted}: no such module"


@pytest.mark.parametrize("page", PAGES, ids=_page_id)
def test_every_relative_link_resolves_inside_the_repository(page: Path) -> None:
    assert link_problems(page) == []


@pytest.mark.parametrize("page", PAGES, ids=_page_id)
def test_no_page_points_outside_the_repository(page: Path) -> None:
    text = page.read_text(encoding="utf-8")
    assert "/work/" not in text
    climbing = [m.group() for m in re.finditer(r"(?:\.\./)+[\w.-]+", text)
                if not (page.parent / m.group()).resolve().is_relative_to(REPO)]
    assert climbing == []


@pytest.mark.parametrize("page", PAGES, ids=_page_id)
def test_every_repository_path_a_page_names_exists(page: Path) -> None:
    missing = sorted({p for p in REPO_PATH.findall(page.read_text(encoding="utf-8")) if not (REPO / p).exists()})
    assert missing == []


@pytest.mark.parametrize("page", PAGES, ids=_page_id)
def test_every_tuner_name_a_page_mentions_exists(page: Path) -> None:
    """Commands pinned to an old commit (a block saying "run at commit ...") may name what has since gone."""
    text = FENCE.sub(lambda m: "" if "run at commit" in m.group() else m.group(), page.read_text(encoding="utf-8"))
    names = sorted(set(TUNER_NAME.findall(text)))
    assert [problem for name in names if (problem := unknown_tuner_name(name))] == []


def test_readme_is_one_page_that_lists_every_command() -> None:
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= README_MAX_LINES
    commands = typer.main.get_command(app).commands
    assert [name for name in commands if f"`dart-tuner {name}" not in text] == []


def test_the_dart_specification_lives_in_the_repository() -> None:
    assert (REPO / "docs" / "design" / "DART.md").is_file()
    assert "docs/design/DART.md" in README.read_text(encoding="utf-8")


def test_code_cites_the_specification_by_its_repository_path_and_existing_sections() -> None:
    """Docstrings and comments say `docs/design/DART.md §N`; a bare `DART.md` or a missing section is stale."""
    sections = set(re.findall(r"^## (\d+)\.", (REPO / "docs" / "design" / "DART.md").read_text(encoding="utf-8"), re.M))
    stale = []
    for source in sorted({*(REPO / "tuner").rglob("*.py"), *(REPO / "tests").rglob("*.py")} - {Path(__file__)}):
        text = source.read_text(encoding="utf-8")
        for match in re.finditer(r"(\S*)DART\.md`*\s*(?:§(\d+)(?:-(\d+))?)?", text):
            prefix, first, last = match.groups()
            cited = {str(n) for n in range(int(first), int(last or first) + 1)} if first else set()
            if not prefix.strip("`'\"(").endswith("docs/design/") or not cited <= sections:
                stale.append(f"{source.relative_to(REPO)}: {match.group()}")
    assert stale == []


def test_the_checks_themselves_catch_a_broken_reference(tmp_path: Path) -> None:
    """A page with a dangling link, a wrong anchor and a climbing link is reported three times."""
    (tmp_path / "docs").mkdir()
    page = tmp_path / "docs" / "probe.md"
    page.write_text("# Probe\n\n[a](missing.md) [b](#no-such-heading) [c](../../outside.md) [d](#probe)\n")
    problems = link_problems(page, repo=tmp_path)
    assert [p.split(":")[0] for p in problems] == ["missing.md", "#no-such-heading", "../../outside.md"]
    assert unknown_tuner_name("tuner.search.space") is None
    assert unknown_tuner_name("tuner.space") == "tuner.space: tuner defines no 'space'"
    assert github_slug("The embedded model: `embedded:tiny-llava-shapes`") == (
        "the-embedded-model-embeddedtiny-llava-shapes")
