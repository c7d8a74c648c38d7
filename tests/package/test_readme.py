"""
The README is short and true: at most 1,050 words; its Layout section names only paths that exist
and every package folder of ``d2kd/``; every relative link (and its ``#anchor``) resolves; the
numbers of its methods table and of the demo are the ones the benchmark scripts wrote to
``benchmarks/results/``.

The Layout block's format: each line that does not start with a space starts with a path
relative to the repository root (folders end with ``/``); further words of that line and of the
indented lines under it that are paths (a folder ending with ``/`` or a file name with an
extension) are relative to that path's folder.
"""

import os
import re

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
README = os.path.join(REPO, "README.md")
MAX_WORDS = 1050
PATH_WORD = re.compile(r"^[A-Za-z0-9_.-]+(?:/[A-Za-z0-9_.-]+)*/?$")
FILE_EXTENSIONS = (".py", ".md", ".yaml", ".cfg", ".txt", ".json")


def _readme():
    with open(README, encoding="utf-8") as f:
        return f.read()


def _outside_code(text):
    """The lines of a Markdown text that are not inside fenced code blocks."""
    lines, fenced = [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if not fenced:
            lines.append(line)
    return lines


def _section(text, title):
    match = re.search(rf"^## {re.escape(title)}\s*$(.*?)(?=^## |\Z)", text, re.S | re.M)
    assert match, f"README.md has no '## {title}' section"
    return match.group(1)


def _layout_block(text):
    match = re.search(r"^```[^\n]*\n(.*?)^```", _section(text, "Layout"), re.S | re.M)
    assert match, "README.md's Layout section has no code block"
    return match.group(1)


def _is_path(word):
    return bool(PATH_WORD.match(word)) and word not in (".", "..", "...") and (
        word.endswith("/") or word.endswith(FILE_EXTENSIONS)
    )


def layout_paths(block):
    """(line number, path relative to the repository) for every path the Layout block names."""
    paths, folder = [], None
    for number, line in enumerate(block.splitlines(), 1):
        if not line.strip():
            continue
        words = [w.strip(",;:()") for w in line.split()]
        if not line[0].isspace():
            head = words.pop(0)
            assert _is_path(head) or "/" in head, (
                f"Layout line {number} does not start with a path: {line.strip()!r}"
            )
            paths.append((number, head))
            folder = head if head.endswith("/") else os.path.dirname(head)
        assert folder is not None, f"Layout line {number} is indented before any path: {line.strip()!r}"
        paths += [(number, os.path.join(folder, w)) for w in words if _is_path(w)]
    return paths


def test_layout_format_is_parsed_as_documented():
    block = "a/ one.py, b/ (two.md)\n   c.yaml words\nd.py the file\n"
    assert layout_paths(block) == [
        (1, "a/"), (1, "a/one.py"), (1, "a/b/"), (1, "a/two.md"), (2, "a/c.yaml"), (3, "d.py"),
    ]


def test_readme_has_at_most_1050_words():
    words = len(_readme().split())
    assert words <= MAX_WORDS, f"README.md has {words} words (`wc -w`), more than {MAX_WORDS}"


def test_every_path_the_layout_names_exists():
    missing = [
        f"line {n}: {path}"
        for n, path in layout_paths(_layout_block(_readme()))
        if not os.path.exists(os.path.join(REPO, path))
    ]
    assert not missing, "README.md's Layout names paths that do not exist:\n" + "\n".join(missing)


def test_layout_names_every_package_folder_of_d2kd():
    named = {path.rstrip("/") for _, path in layout_paths(_layout_block(_readme()))}
    packages = []
    for folder, dirs, files in os.walk(os.path.join(REPO, "d2kd")):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        if "__init__.py" in files:
            packages.append(os.path.relpath(folder, REPO).replace(os.sep, "/"))
    assert "d2kd/heads" in packages
    unnamed = [p + "/" for p in packages if p not in named]
    assert not unnamed, "README.md's Layout does not name these package folders:\n" + "\n".join(unnamed)


def github_anchor(heading):
    """The ``#anchor`` GitHub gives a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    return text.replace(" ", "-")


def _anchors(path):
    with open(path, encoding="utf-8") as f:
        headings = [line.lstrip("#").strip() for line in _outside_code(f.read()) if re.match(r"#{1,6} ", line)]
    anchors, seen = set(), {}
    for heading in headings:
        anchor = github_anchor(heading)
        count = seen.get(anchor, 0)
        seen[anchor] = count + 1
        anchors.add(anchor if count == 0 else f"{anchor}-{count}")
    return anchors


def test_github_anchor_of_headings():
    assert github_anchor("Accuracy on BCCD (`benchmarks/accuracy.py`)") == "accuracy-on-bccd-benchmarksaccuracypy"
    assert (
        github_anchor("Inheriting the teacher's neck and heads (FGD's `init_student`)")
        == "inheriting-the-teachers-neck-and-heads-fgds-init_student"
    )


def test_every_relative_link_of_the_readme_resolves():
    text = "\n".join(_outside_code(_readme()))
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    assert links
    broken = []
    for link in links:
        if re.match(r"[a-z]+:", link):  # https:, mailto:
            continue
        target, _, anchor = link.partition("#")
        path = os.path.join(REPO, target) if target else README
        if not os.path.exists(path):
            broken.append(f"{link}: {target} does not exist")
        elif anchor and path.endswith(".md") and anchor not in _anchors(path):
            broken.append(f"{link}: no heading #{anchor} in {target or 'README.md'}")
    assert not broken, "README.md links that do not resolve:\n" + "\n".join(broken)


def _results(name):
    with open(os.path.join(REPO, "benchmarks", "results", name), encoding="utf-8") as f:
        return f.read().replace("−", "-")


def test_methods_table_numbers_are_the_accuracy_reports():
    """Each ΔAP of the table is the paired ΔAP column of the report `benchmarks/accuracy.py` wrote."""
    reports = {"": _results("bccd_accuracy_short300.md"), "inherit": _results("bccd_accuracy_short300_zen5.md")}
    rows = [line for line in _section(_readme(), "Methods").splitlines() if line.startswith("| [")]
    assert len(rows) >= 13
    wrong = []
    for row in rows:
        name = re.match(r"\| \[`?(\w+)`?\]", row).group(1)
        cell = row.rstrip(" |").split(" | ")[-1].replace("−", "-")
        for value, n in re.findall(r"([+-]\d+\.\d ± \d+\.\d)(?: \((\d)\))?", cell):
            report = reports.get(name, reports[""])
            methods = [name] if name != "inherit" or "fgd" not in cell.split(value)[0] else ["fgd_inherit"]
            pairs = f"{value} ({n or 3})"
            if not any(re.search(rf"^\| {m} \|.*\| {re.escape(pairs)} \|", report, re.M) for m in methods):
                wrong.append(f"{name}: {value} ({n or 3} seeds) is not in its report")
    assert not wrong, "\n".join(wrong)


def test_demo_numbers_are_demo_seeds_report():
    demo = " ".join(_section(_readme(), "The two commands").split())
    report = _results("demo_seeds.md")
    assert "python benchmarks/demo_seeds.py" in demo
    assert "+0.7 ± 1.3" in demo and "**+0.7 ± 1.3**" in report
    assert "Teacher: AP 24.7" in report and "| 0 | 23.2 |" in report and "| 24.5 |" in report
    assert all(number in demo for number in ("24.7", "23.2", "24.5"))
