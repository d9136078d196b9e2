"""README is a front page and docs/ holds the rest: every relative link and anchor in the Markdown resolves,
README links every docs page, and the commands of the benchmark summary parse.

(Fenced `vpn-dist` commands of README.md and docs/*.md are parsed in tests/test_cluster_files.py, docs/api.md's
example runs in tests/test_readme.py.)
"""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from cli_commands import check_vpn_command

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCS = sorted((REPO / "docs").glob("*.md"))
MARKDOWN = [README, *DOCS, REPO / "cluster" / "README.md"]
README_MAX_LINES = 150  # a front page a newcomer reads in five minutes; the rest belongs in docs/

FENCE = re.compile(r"^ *(```|~~~)[^\n]*\n.*?^ *\1[^\n]*$", re.S | re.M)
INLINE_CODE = re.compile(r"(`+).+?\1", re.S)
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def _prose(markdown: str) -> str:
    """The Markdown without code: fenced blocks and inline code spans hold no links or headings."""
    return INLINE_CODE.sub("", FENCE.sub("", markdown))


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading keeps its text
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in FENCE.sub("", path.read_text()).splitlines():
        match = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not match:
            continue
        slug = github_slug(match.group(1))
        out.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
        seen[slug] = seen.get(slug, 0) + 1
    return out


def links(path: Path) -> list[str]:
    return LINK.findall(_prose(path.read_text()))


def _relative_links():
    for path in MARKDOWN:
        for target in links(path):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                continue
            yield path, target


RELATIVE_LINKS = list(_relative_links())


@pytest.mark.parametrize("path,target", RELATIVE_LINKS,
                         ids=[f"{p.relative_to(REPO)}->{t}" for p, t in RELATIVE_LINKS])
def test_relative_link_resolves(path, target):
    file_part, _, anchor = target.partition("#")
    dest = (path.parent / file_part).resolve() if file_part else path
    where = f"{path.relative_to(REPO)}: link {target!r}"
    assert dest.exists(), f"{where}: {dest} does not exist"
    assert dest == REPO or REPO in dest.parents, f"{where} leaves the repository"
    if anchor:
        assert dest.suffix == ".md", f"{where}: an anchor into a file that is not Markdown"
        assert anchor in anchors(dest), f"{where}: no heading with anchor #{anchor} in {dest.relative_to(REPO)}"


def test_link_checker_catches_broken_links(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# A page: with `code`\n\n## Défaults and presets\n\n```\n# not a heading\n```\n"
                    "[ok](#a-page-with-code) [x](missing.md) ![img](figure.png) `[not](a-link.md)`\n")
    assert anchors(page) == {"a-page-with-code", "défaults-and-presets"}
    assert links(page) == ["#a-page-with-code", "missing.md", "figure.png"]


def test_links_were_found():
    sources = {path for path, _ in RELATIVE_LINKS}
    assert README in sources and len(sources & set(DOCS)) >= 5, sources  # the extraction finds links at all
    assert any("#" in target for _, target in RELATIVE_LINKS)


def test_readme_is_a_front_page():
    lines = README.read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, (
        f"README.md has {len(lines)} lines; keep it a front page (at most {README_MAX_LINES}) and move detail "
        "to a docs/ page")
    readme_links = {(REPO / target.partition("#")[0]).resolve() for target in links(README)}
    unlinked = [page.name for page in DOCS if page.resolve() not in readme_links]
    assert not unlinked, f"README.md does not link these docs pages (add them to its Documentation list): {unlinked}"
    images = [t for t in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", _prose(README.read_text()))]
    assert images and all((REPO / t).is_file() for t in images), images


def test_the_config_key_table_is_made_from_the_settings():
    """docs/config.md's key table is RunConfig's settings as `markdown_table` writes them: every key, its default and
    its doc, so the page cannot drift from the code."""
    from vpn_dist.config import config_keys, markdown_table

    text = (REPO / "docs" / "config.md").read_text()
    section = text[text.index("\n## Config keys\n"):]
    section = section[:section.find("\n## ", 1)] if "\n## " in section[1:] else section
    table = "\n".join(line for line in section.splitlines() if line.startswith("| ")) + "\n"
    assert table.count("\n| `") == len(config_keys())
    assert table == markdown_table(), ("docs/config.md's Config keys table differs from the settings in "
                                       "vpn_dist/config.py; paste in `vpn_dist.config.markdown_table()`:\n"
                                       + markdown_table())


def _summary_commands() -> list[tuple[str, list[str]]]:
    """docs/benchmarks.md's summary table: the `vpn-dist ...` spans of its command column."""
    text = (REPO / "docs" / "benchmarks.md").read_text()
    section = text[text.index("\n## Summary\n"):]
    section = section[:section.index("\n## ", 1)]
    rows = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| ---")]
    header = [cell.strip() for cell in rows[0].strip("|").split(" | ")]
    column = header.index("command")
    found = []
    for row in rows[1:]:
        cell = re.split(r"(?<!\\) \| ", row.strip().strip("|"))[column]
        for span in re.findall(r"`(vpn-dist [^`]+)`", cell):
            if "..." not in span:
                found.append((row.split(" | ")[0].strip("| "), shlex.split(span)))
    return found


def test_benchmark_summary_commands_parse():
    commands = _summary_commands()
    assert len(commands) >= 8, commands
    for what, argv in commands:
        check_vpn_command(argv, where=f"docs/benchmarks.md summary, {what}")


def _statistics_rows(report: Path) -> list[dict[str, str]]:
    """The Statistics table of a reproduction report, one dict per row, keyed by its header."""
    lines = report.read_text().split("## Statistics", 1)[1].strip().splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = []
    for line in lines[2:]:
        if not line.startswith("|"):
            break
        rows.append(dict(zip(header, (c.strip() for c in line.strip("|").split("|")))))
    return rows


def test_readme_verdict_table_is_the_reports():
    """Each row of README's "Does VPN reproduce?" table is the Statistics rows of the reports it links: the claim's
    table, bases and rule pick the rows; the paper's gains, the interval (or the range of the differences) and the
    verdict must be theirs."""
    section = README.read_text().split("## Does VPN reproduce?", 1)[1].split("\n## ", 1)[0]
    table = [line for line in section.splitlines() if line.startswith("| Table")]
    assert len(table) >= 8, table
    number = lambda text: float(text.replace("−", "-"))  # noqa: E731
    for line in table:
        claim, where, ours, verdict = (c.strip() for c in line.strip("|").split("|"))
        found = re.fullmatch(r"Table (\d), (DNN3 and SR|DNN3|SR)(, no noise)?: ([-+−0-9., ]+)", claim)
        assert found, f"README verdict row {claim!r}: write it as 'Table N, BASES[, no noise]: +GAIN, ...'"
        bases = {"DNN3 and SR": {"dnn3", "sr"}, "DNN3": {"dnn3"}, "SR": {"sr"}}[found[2]]
        rule = "dnn3 (no noise)" if found[3] else "dnn3"
        reports = [REPO / target for target in re.findall(r"\]\(([^)]+/report\.md)\)", where)]
        assert reports, f"README verdict row {claim!r} links no report"
        rows = [r for report in reports for r in _statistics_rows(report)
                if r["table"] == found[1] and r["base"] in bases and r["row"] == rule]
        assert rows, f"README verdict row {claim!r}: no such rows in {reports}"
        assert {number(g) for g in found[4].split(",")} == {number(r["paper's gain"]) for r in rows}, line
        assert {verdict} == {r["verdict"] for r in rows}, line
        differences = [r["Δ baseline [95% CI] (n)"] for r in rows]
        if " to " in ours:  # a range over several rows: their smallest and largest difference
            low, high = (number(v) for v in ours.split(" to "))
            means = [number(d.split(" ")[0]) for d in differences]
            assert (low, high) == (min(means), max(means)), line
        else:
            assert len(rows) == 1 and ours.replace("−", "-") == differences[0].rsplit(" (", 1)[0], line


def test_readme_tuning_table_is_the_studies():
    """Each row of README's "Does tuning rescue VPN?" table is its study's: the mean test accuracy over the re-run
    seeds of each winner and of the matched baseline (from seeds.csv; — where the winners are one trial), and the
    report's Algorithm 2 rows of the test comparison, against the baseline winner and the matched baseline (the
    interval, the paper's gain, the verdicts)."""
    import csv
    import statistics

    section = README.read_text().split("## Does tuning rescue VPN?", 1)[1].split("\n## ", 1)[0]
    table = [line for line in section.splitlines() if line.startswith("| [")]
    assert table, "README's tuning section has no study rows"
    for line in table:
        where, baseline, vpn, ours, matched, ours_matched, gain, verdicts = (c.strip() for c in
                                                                              line.strip("|").split("|"))
        (target,) = re.findall(r"\]\((reproduction/tuned-[^)]+)/report\.md\)", where)
        with open(REPO / target / "seeds.csv", newline="") as f:
            seeds = [r for r in csv.DictReader(f) if r["status"] == "finished"]  # not a re-run still pending
        means = {group: f"{100 * statistics.mean(float(r['test_acc']) for r in seeds if r['arm'] == group):.2f}"
                 for group in ("baseline", "vpn", "matched") if any(r["arm"] == group for r in seeds)}
        assert (baseline, vpn, matched) == (means["baseline"], means["vpn"], means.get("matched", "—")), line
        comparison = (REPO / target / "report.md").read_text().split("| VPN − baseline |", 1)[1].splitlines()

        def cells(label: str) -> list[str] | None:
            found = [r for r in comparison if r.startswith(f"| {label} |")]
            return [c.strip() for c in found[0].strip("|").split("|")] if found else None

        winners, control = cells("Algorithm 2"), cells("Algorithm 2 − matched baseline")
        assert ours == winners[1].rsplit(" (", 1)[0] and gain == winners[4], line
        assert ours_matched == (control[1].rsplit(" (", 1)[0] if control else "—"), line
        assert verdicts == f"{winners[7]}; {control[7] if control else '—'}", line
