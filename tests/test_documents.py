"""Checks of the Documents/ folder: the bibliography, the figure script and the links between the pages."""
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from Documents.make_figures import main, task_activation
from Training import UserError

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "Documents"

EXPECTED_KEYS = {
    "liu2020taan",
    "long2017mrn",
    "yang2017dmtrl",
    "meyerson2018soft",
    "misra2016cross",
    "ma2018mmoe",
}


def parse_bib(text):
    """Tiny BibTeX reader: {key: {field: value}} for entries written as
    @type{key, field = {value}, ...} with at most one level of nested braces."""
    entries = {}
    for match in re.finditer(r"@(\w+)\s*\{\s*([^,\s]+)\s*,(.*?)\n\}", text, flags=re.S):
        key, body = match.group(2), match.group(3)
        if key in entries:
            raise ValueError(f"duplicate key {key}")
        fields = {}
        for f in re.finditer(r"(\w+)\s*=\s*\{((?:[^{}]|\{[^{}]*\})*)\}", body):
            fields[f.group(1).lower()] = " ".join(f.group(2).split())
        entries[key] = dict(fields, entrytype=match.group(1).lower())
    return entries


def test_parse_bib_reads_fields_and_rejects_duplicates():
    text = "@article{k1,\n  title = {A {B} c},\n  year = {2001},\n}\n@misc{k2,\n  author = {X, Y},\n}\n"
    entries = parse_bib(text)
    assert entries == {
        "k1": {"title": "A {B} c", "year": "2001", "entrytype": "article"},
        "k2": {"author": "X, Y", "entrytype": "misc"},
    }
    try:
        parse_bib(text + text)
    except ValueError as err:
        assert "duplicate key k1" in str(err)
    else:
        raise AssertionError("duplicate keys were accepted")


def test_references_bib_has_the_six_entries():
    text = (DOCS / "references.bib").read_text(encoding="utf-8")
    entries = parse_bib(text)
    assert set(entries) == EXPECTED_KEYS
    # every entry in the file was parsed (no entry lost to the regex)
    assert len(re.findall(r"^@\w+\s*\{", text, flags=re.M)) == len(EXPECTED_KEYS)
    for key, fields in entries.items():
        for name in ("title", "author", "year"):
            assert fields.get(name), f"{key} has no {name}"
        assert re.fullmatch(r"(19|20)\d\d", fields["year"]), key
    taan = entries["liu2020taan"]
    assert taan["year"] == "2020"
    assert taan["pages"] == "4924--4931"
    assert taan["doi"] == "10.1609/aaai.v34i04.5930"
    assert taan["author"].startswith("Liu, Yingru and ")
    assert taan["author"].count(" and ") == 6
    assert {k: entries[k]["year"] for k in EXPECTED_KEYS} == {
        "liu2020taan": "2020", "long2017mrn": "2017", "yang2017dmtrl": "2017",
        "meyerson2018soft": "2018", "misra2016cross": "2016", "ma2018mmoe": "2018",
    }


def test_make_figures_writes_png_and_pdf(tmp_path):
    result = subprocess.run([sys.executable, str(DOCS / "make_figures.py"), "--out-dir", str(tmp_path)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    png, pdf = tmp_path / "architecture.png", tmp_path / "architecture.pdf"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert pdf.read_bytes()[:5] == b"%PDF-"
    assert png.stat().st_size > 10_000 and pdf.stat().st_size > 10_000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["architecture.pdf", "architecture.png"]


def test_make_figures_missing_out_dir_is_a_clear_error(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(UserError, match="does not exist"):
        main(["--out-dir", str(missing)])
    assert not missing.exists()


def test_task_activation_matches_hand_computed_values():
    b = np.array([-1.0, 0.5])
    alpha_t = np.array([2.0, -3.0])
    a = np.array([-2.0, 0.0, 1.0])
    # a=-2: relu(-2)=0, relu(-1+2)=1, relu(0.5+2)=2.5 -> 2*1 - 3*2.5 = -5.5
    # a= 0: 0 + 2*relu(-1) - 3*relu(0.5) = -1.5
    # a= 1: 1 + 0 + 0 = 1
    assert np.allclose(task_activation(a, b, alpha_t), [-5.5, -1.5, 1.0])


def test_ci_runs_exactly_the_readme_test_command():
    """.ci/run must run the test command README.md gives (the block after 'Run the tests')."""
    readme = (ROOT / "README.md").read_text()
    block = readme.split("Run the tests:", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0].strip()
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()
                if line.strip() and not line.lstrip().startswith("#")]
    assert block == "python -m pytest -q tests"
    assert ci_lines[-1] == block
    # ... and installs the way README's first command does
    setup = readme.split("```bash\n", 1)[1].split("```", 1)[0]
    install = [part.strip() for part in setup.split("&&") if part.strip().startswith("pip install")]
    assert install == ['pip install -e ".[dev]"']
    assert [line.replace(" -q", "") for line in ci_lines if line.startswith("pip install")] == install


# --- relative links in README.md and Documents/*.md -------------------------------------------

FENCE = re.compile(r"^ {0,3}(```|~~~).*?^ {0,3}\1[^\n]*$", flags=re.S | re.M)
INLINE_CODE = re.compile(r"(`+).+?\1", flags=re.S)
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^ {0,3}#{1,6}[ \t]+(.+?)[ \t#]*$", flags=re.M)


def github_anchor(heading):
    """GitHub's anchor of a heading: lowercase, punctuation except '-' and '_' dropped,
    each space turned into '-' (inline code marks and link syntax count as punctuation)."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip())   # [text](url) -> text
    return re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")


def anchors(markdown):
    """Every anchor the headings of a markdown text define; repeats get -1, -2, ... as on GitHub."""
    seen, out = {}, set()
    for heading in HEADING.findall(FENCE.sub("", markdown)):
        base = github_anchor(heading)
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def links(markdown):
    """The targets of the markdown links and images of a text, outside code blocks and code spans."""
    return LINK.findall(INLINE_CODE.sub("", FENCE.sub("", markdown)))


def broken_links(path):
    """The relative links of the markdown file `path` whose file is missing, or whose #anchor names
    no heading of the markdown file it points into."""
    text = path.read_text(encoding="utf-8")
    broken = []
    for target in links(text):
        if re.match(r"[a-zA-Z][a-zA-Z0-9+.-]*:", target):        # http:, https:, mailto:, ...
            continue
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        if not dest.exists():
            broken.append(f"{target}: no file {dest}")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest.read_text(encoding="utf-8")):
            broken.append(f"{target}: no heading '{anchor}' in {dest.name}")
    return broken


def test_github_anchor_rule():
    assert github_anchor("Quick start") == "quick-start"
    assert github_anchor("Installing, commands and folders") == "installing-commands-and-folders"
    assert github_anchor("The paper's whole figure: one command") == "the-papers-whole-figure-one-command"
    assert github_anchor("TAL: the TAAN layer") == "tal-the-taan-layer"
    assert github_anchor("Youtube-8M") == "youtube-8m"
    assert github_anchor("`TAL_Linear` and [MRN](x.md)") == "tal_linear-and-mrn"


def test_link_checker_finds_broken_links(tmp_path):
    (tmp_path / "other.md").write_text("# Other page\n\n## A, b: c\n\n```\n# not a heading\n```\n")
    (tmp_path / "fig.png").write_bytes(b"")
    page = tmp_path / "page.md"
    page.write_text("# Title\n\n## Part two\n\n"
                    "[ok](other.md) [ok](other.md#a-b-c) [ok](#part-two) ![ok](fig.png) [web](https://x.org/a#b)\n"
                    "[bad](missing.md) [bad](other.md#not-a-heading) [bad](#nowhere) `[code](missing2.md)`\n"
                    "```\n[code](missing3.md)\n```\n")
    assert [b.split(":")[0] for b in broken_links(page)] == ["missing.md", "other.md#not-a-heading", "#nowhere"]


def test_relative_links_in_readme_and_documents_resolve():
    pages = [ROOT / "README.md"] + sorted(DOCS.glob("*.md"))
    assert len(pages) >= 4
    assert len(links((ROOT / "README.md").read_text(encoding="utf-8"))) >= 10
    broken = {str(p.relative_to(ROOT)): broken_links(p) for p in pages}
    assert {k: v for k, v in broken.items() if v} == {}


def test_no_file_cites_a_document_the_repository_does_not_hold():
    """Files (and the table Omniglot.reproduce writes) cited sections of a specification that users
    cannot read; they cite README sections."""
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    if not files:
        pytest.skip("not a git checkout")
    citing = [name for name in files if name.endswith((".py", ".md", ".sh", ".toml", ".txt"))
              and re.search(r"\bSPEC\b", (ROOT / name).read_text(encoding="utf-8"))]
    assert citing == []
