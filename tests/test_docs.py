"""README.md and docs/ stay valid: links resolve (anchors by GitHub's slug rules), every page is linked
from the README, the README stays short, and its commands table matches the CLI's command table."""
import os
import re
from pathlib import Path

from preftune.cli import COMMANDS, main

ROOT = Path(__file__).parents[1]
README_MAX_LINES = 300
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
CODE_SPAN = re.compile(r"`[^`]*`")
SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:")


def prose_lines(text: str):
    """(line number, line) of the lines outside fenced code blocks (fences may be indented)."""
    fenced = False
    for n, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if not fenced:
            yield n, line


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: the rendered text (code ticks, emphasis and link targets gone),
    lower-cased, every character but letters, digits, ``_``, ``-`` and spaces dropped, each space a ``-``."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = text.replace("`", "").replace("*", "")
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors(text: str) -> set[str]:
    """Every heading's anchor; a repeated slug gets ``-1``, ``-2``, ... as on GitHub."""
    seen: dict[str, int] = {}
    out = set()
    for _, line in prose_lines(text):
        m = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        s = slug(m.group(1))
        out.add(s if s not in seen else f"{s}-{seen[s]}")
        seen[s] = seen.get(s, 0) + 1
    return out


def pages(root: Path) -> list[Path]:
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def link_targets(page: Path):
    """(line number, target) of each relative link of a page, outside code blocks and code spans."""
    for n, line in prose_lines(page.read_text(encoding="utf-8")):
        for target in LINK.findall(CODE_SPAN.sub("", line)):
            if not SCHEME.match(target):
                yield n, target


def broken_links(root: Path) -> list[str]:
    """Problems with README.md and docs/*.md under ``root``: relative links to missing files or headings,
    and docs pages that README.md does not link."""
    problems, linked = [], set()
    for page in pages(root):
        for n, target in link_targets(page):
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page.resolve()
            where = f"{page.relative_to(root)}:{n}: link {target!r}"
            if not dest.exists():
                problems.append(f"{where}: no file {os.path.relpath(dest, root.resolve())}")
                continue
            if page.name == "README.md" and page.parent == root:
                linked.add(dest)
            if anchor and dest.suffix == ".md" and anchor not in anchors(dest.read_text(encoding="utf-8")):
                problems.append(f"{where}: no heading with the anchor #{anchor} in {dest.name}")
    for page in pages(root)[1:]:
        if page.resolve() not in linked:
            problems.append(f"{page.relative_to(root)}: not linked from README.md (add it to its Documentation list)")
    return problems


def table_commands(readme: str) -> tuple[set[str], list[str]]:
    """The CLI commands named in the README's "## Commands" table (each `preftune NAME ...` in the first
    column), and the spans there that name no command of ``COMMANDS``."""
    section = readme.split("\n## Commands\n", 1)[1].split("\n## ", 1)[0]
    named, unknown = set(), []
    for line in section.splitlines():
        if not line.startswith("|") or line.startswith("|---") or line.startswith("| command |"):
            continue
        for span in CODE_SPAN.findall(line.split("|")[1]):
            words = span.strip("`").split()
            name = " ".join(words[1:3]) if " ".join(words[1:3]) in COMMANDS else " ".join(words[1:2])
            if words[:1] != ["preftune"] or name not in COMMANDS:
                unknown.append(span)
            else:
                named.add(name)
    return named, unknown


def test_every_link_in_readme_and_docs_resolves_and_every_page_is_linked():
    assert broken_links(ROOT) == []


def test_the_checker_finds_planted_broken_links(tmp_path):
    """A missing file, a missing heading and an unlinked page are each reported by file and line; links
    inside code, links to the web and a repeated heading's ``-1`` anchor are not problems."""
    (tmp_path / "docs").mkdir()
    (tmp_path / "README.md").write_text(
        "# Tool\n\n[data](docs/data.md), [formats](docs/data.md#formats-and-mapping),\n"
        "[notes again](docs/data.md#notes-1), [web](https://example.com/x.md) and `[code](nowhere.md)`\n\n"
        "[gone](docs/gone.md) and [no such heading](docs/data.md#nowhere)\n\n```\n[fenced](nowhere.md)\n```\n")
    (tmp_path / "docs" / "data.md").write_text(
        "# Data\n\n## Formats and `mapping`\n\n## Notes\n\n## Notes\n\n[back](../README.md#tool)\n")
    (tmp_path / "docs" / "orphan.md").write_text("# Orphan\n\n[up](../README.md)\n")
    assert broken_links(tmp_path) == [
        "README.md:6: link 'docs/gone.md': no file docs/gone.md",
        "README.md:6: link 'docs/data.md#nowhere': no heading with the anchor #nowhere in data.md",
        "docs/orphan.md: not linked from README.md (add it to its Documentation list)",
    ]
    (tmp_path / "README.md").write_text("# Tool\n\n[data](docs/data.md) [orphan](docs/orphan.md#orphan)\n")
    assert broken_links(tmp_path) == []


def test_slugs_follow_githubs_rules():
    assert slug("Drops, truncation and `max_drop_fraction`") == "drops-truncation-and-max_drop_fraction"
    assert slug("Scale-out: many processes and machines") == "scale-out-many-processes-and-machines"
    assert slug("Why our own server and not `transformers serve`") == "why-our-own-server-and-not-transformers-serve"
    assert slug("**Bold** and [a link](x.md)") == "bold-and-a-link"
    assert anchors("## Notes\n\n## Notes\n\n```\n## not a heading\n```\n") == {"notes", "notes-1"}


def test_readme_is_at_most_300_lines():
    n = len((ROOT / "README.md").read_text(encoding="utf-8").splitlines())
    assert n <= README_MAX_LINES, f"README.md has {n} lines; move detail to a docs/ page (at most {README_MAX_LINES})"


def test_readme_commands_table_is_the_cli_command_table():
    named, unknown = table_commands((ROOT / "README.md").read_text(encoding="utf-8"))
    assert unknown == [], f"README's commands table names commands the CLI lacks: {unknown}"
    missing = sorted(set(COMMANDS) - named)
    assert missing == [], f"commands of preftune.cli.COMMANDS missing from README's commands table: {missing}"


def test_the_table_check_finds_unknown_and_missing_commands():
    readme = ("# x\n\n## Commands\n\n| command | what it does |\n|---|---|\n"
              "| `preftune sft CONFIG`, `preftune eval rewards` | ok |\n| `preftune frobnicate` | no such |\n"
              "| `eval tasks` | no preftune prefix |\n\n## Configuration\n\n| `preftune nothing` | outside |\n")
    named, unknown = table_commands(readme)
    assert named == {"sft", "eval rewards"}
    assert unknown == ["`preftune frobnicate`", "`eval tasks`"]


def test_every_docs_page_starts_with_the_command_a_user_runs():
    """Each page opens with its title and then a fenced block of commands."""
    for page in sorted((ROOT / "docs").glob("*.md")):
        blocks = [b for b in page.read_text(encoding="utf-8").split("\n\n") if b.strip()]
        assert blocks[0].startswith("# ") and blocks[1].startswith("```"), \
            f"{page.relative_to(ROOT)}: start with '# Title', then a ``` block with the command a user runs"


def test_readmes_minimal_config_loads(tmp_path, capsys):
    """The config of "Your own data and model" is a valid config: `preftune config show` accepts it."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("\n## Your own data and model\n", 1)[1]
    yaml_block = section.split("```yaml\n", 1)[1].split("\n```", 1)[0]
    (tmp_path / "mine.yaml").write_text(yaml_block)
    assert main(["config", "show", str(tmp_path / "mine.yaml")]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "source: data/prefs.jsonl" in out and "judge: openai" in out

