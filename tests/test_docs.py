"""README.md and docs/*.md: every relative link resolves, and every code block meant to run does run.

Links: each ``[text](target)`` and ``![alt](target)`` outside code, other than ``http(s)://`` and
``mailto:``, must name a file or directory relative to the Markdown file; a ``#anchor`` (alone, or after a
Markdown file) must be the GitHub slug of a heading of that file.

Code blocks, the convention: a fenced block whose info string is ``python`` is run, unless the last
non-blank line before its opening fence is the HTML comment ``<!-- not run -->``. Blocks of any other
language (``bash``, ``yaml``, ``text``, ...) are never run. Each runnable block runs alone in a fresh
``python`` subprocess, on the CPU (``CUDA_VISIBLE_DEVICES=""``), offline (the Hugging Face offline
switches), from a temporary directory, with the repository root first on ``PYTHONPATH``, under a timeout.
A block that imports TRL is skipped where TRL (or ``datasets``) is not installed.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
NOT_RUN = "<!-- not run -->"
TIMEOUT_S = 120
FENCE = re.compile(r"^(\s*)(```+|~~~+)\s*([\w+-]*)")
LINK = re.compile(r"!?\[(?:[^\]\\]|\\.)*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
INLINE_CODE = re.compile(r"(`+).*?\1")


def blocks(path: Path) -> tuple[list[tuple[int, str, bool, str]], list[tuple[int, str]]]:
    """(code blocks as (line, language, runnable, source), prose lines as (line, text)) of a Markdown file."""
    code, prose = [], []
    lines = path.read_text().splitlines()
    i = 0
    previous = ""  # the last non-blank prose line
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            prose.append((i + 1, lines[i]))
            if lines[i].strip():
                previous = lines[i].strip()
            i += 1
            continue
        fence, lang, start = m.group(2), m.group(3).lower(), i + 1
        body = []
        i += 1
        while i < len(lines) and not lines[i].strip().startswith(fence):
            body.append(lines[i])
            i += 1
        i += 1  # the closing fence
        code.append((start, lang, lang == "python" and previous != NOT_RUN, "\n".join(body) + "\n"))
        previous = ""
    return code, prose


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"`|\*\*|__", "", heading.strip().lower())
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for _, line in blocks(path)[1]:
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            base = slug(m.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            out.add(base if n == 0 else f"{base}-{n}")
    return out


def links(path: Path) -> list[tuple[int, str]]:
    found = []
    for number, line in blocks(path)[1]:
        for m in LINK.finditer(INLINE_CODE.sub("", line)):
            found.append((number, m.group(1)))
    return found


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


LINK_CASES = [(doc, number, target) for doc in DOCS for number, target in links(doc)]
CODE_CASES = [
    (doc, start, source) for doc in DOCS for start, _, runnable, source in blocks(doc)[0] if runnable
]


def test_the_documents_exist_and_readme_stays_short():
    names = {rel(d) for d in DOCS}
    for doc in ("api", "trainer", "trl", "architecture", "benchmarks"):
        assert f"docs/{doc}.md" in names
    assert (ROOT / "README.md").stat().st_size <= 10 * 1024
    assert len(LINK_CASES) > 10 and len(CODE_CASES) >= 5  # the conventions above are in use


@pytest.mark.parametrize(
    ("doc", "line", "target"), LINK_CASES, ids=[f"{rel(d)}:{n}:{t}" for d, n, t in LINK_CASES]
)
def test_relative_link_resolves(doc, line, target):
    if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
        assert target.startswith(("http://", "https://", "mailto:")), f"{rel(doc)}:{line}: {target}"
        return
    file_part, _, anchor = target.partition("#")
    dest = (doc.parent / file_part).resolve() if file_part else doc
    assert dest.exists(), f"{rel(doc)}:{line}: {target} -> {dest} does not exist"
    if anchor:
        assert dest.suffix == ".md", f"{rel(doc)}:{line}: an anchor into a file that is not Markdown"
        assert anchor in anchors(dest), f"{rel(doc)}:{line}: no heading #{anchor} in {rel(dest)}"


def test_no_issue_numbers_in_the_documents():
    for doc in DOCS:
        for number, line in enumerate(doc.read_text().splitlines(), 1):
            assert not re.search(r"[Ii]ssue[ -]?#?\d+", line), f"{rel(doc)}:{number}: {line}"


def test_example_config_lists_every_loss_type():
    from grpo_fast.config import LOSS_TYPES

    lines = (ROOT / "configs/example_hf_model.yaml").read_text().splitlines()
    line = next(x for x in lines if x.startswith("loss_type:"))
    listed = re.findall(r"\w+", line.split("#", 1)[1].split("(")[0])
    assert listed == list(LOSS_TYPES)


@pytest.mark.parametrize(
    ("doc", "line", "source"), CODE_CASES, ids=[f"{rel(d)}:{n}" for d, n, _ in CODE_CASES]
)
def test_code_block_runs(doc, line, source, tmp_path):
    if re.search(r"^\s*(from|import) trl\b", source, re.M):
        for module in ("trl", "datasets"):
            if importlib.util.find_spec(module) is None:
                pytest.skip(f"{module} is not installed")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]),
        "CUDA_VISIBLE_DEVICES": "",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "WANDB_DISABLED": "true",
        "TOKENIZERS_PARALLELISM": "false",
    }
    script = tmp_path / "example.py"
    script.write_text(source)
    try:
        out = subprocess.run(
            [sys.executable, str(script)],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=TIMEOUT_S,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"{rel(doc)}:{line}: the example ran over {TIMEOUT_S} s")
    assert out.returncode == 0, f"{rel(doc)}:{line} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
