"""Docs that run: every fenced code block of README.md and docs/**/*.md is executed or parsed.

- ```python blocks run with the venv's Python, ```bash blocks with `bash -e -o pipefail` and the venv's
  bin/ first on PATH, in one temporary folder per Markdown file, in the order they appear (a later block
  uses what an earlier one wrote, as a reader following the page would); ```yaml blocks are parsed;
  ```text blocks (diagrams, usage synopses, sample output) are not code.
- A block whose info string holds `norun` (```bash norun) is only syntax-checked (`bash -n`, `compile()`);
  it is for blocks that need user data, a GPU or a download, and must say why in a `#` comment.
- A block with no language, or one not listed above, fails the test: a new block must be runnable or say why not.
- Each section (the nearest heading of level 1-3 above a block) runs in its own folder, as its own test, so the
  pages' sections run in parallel. A section that reads what an earlier one wrote says so with the comment
  `<!-- docs-test: same folder as "HEADING" -->` on a line just above its first block: it then runs after that
  section, in its folder, in the same test.
Blocks use small sizes (a few slides, a few epochs) so each section stays within about a minute of CPU.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
LANGUAGES = ("python", "bash", "yaml", "text")
FENCE = re.compile(r"^ {0,3}```(.*)$")
HEADING = re.compile(r"^#{1,3} +(.+?)\s*$")
SAME_FOLDER = re.compile(r'<!-- docs-test: same folder as "(.+?)" -->')


@dataclass
class Block:
    path: Path
    line: int
    language: str
    norun: bool
    code: str
    section: str = ""

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line} ({self.language}{' norun' if self.norun else ''})"


def read_blocks(path: Path) -> list[Block]:
    """The fenced blocks of a Markdown file, with the line of their opening fence and their info string."""
    blocks, opened, body, section, joined = [], None, [], "", None
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        fence = FENCE.match(line)
        if opened is None and fence:
            opened, body = (number, fence.group(1).split()), []
        elif opened is not None and fence and not fence.group(1).strip():
            words = opened[1]
            blocks.append(Block(path, opened[0], words[0] if words else "", "norun" in words[1:], "\n".join(body) + "\n",
                                joined or section))
            opened = None
        elif opened is not None:
            body.append(line)
        elif HEADING.match(line):
            section, joined = HEADING.match(line).group(1), None
        elif SAME_FOLDER.search(line):
            joined = SAME_FOLDER.search(line).group(1)
    assert opened is None, f"{path.relative_to(ROOT)}:{opened[0]}: a code block is never closed"
    return blocks


ALL_BLOCKS = [b for path in DOC_FILES for b in read_blocks(path)]


def test_the_docs_have_blocks_of_every_kind():
    kinds = {(b.language, b.norun) for b in ALL_BLOCKS}
    assert {("python", False), ("bash", False), ("bash", True), ("text", False)} <= kinds, kinds


@pytest.mark.parametrize("block", ALL_BLOCKS, ids=[b.where for b in ALL_BLOCKS])
def test_block_is_labelled_and_checked(block):
    """Every block names a language we run; a norun block parses and says why it is not run."""
    assert block.language in LANGUAGES, (
        f"{block.where}: label the block ```python, ```bash, ```yaml or ```text (not code); "
        "```bash norun only for user data, a GPU or a download, with the reason in a # comment")
    if block.language == "yaml":
        yaml.safe_load(block.code)
    if block.norun:
        assert block.language in ("bash", "python"), f"{block.where}: norun is for bash and python blocks"
        assert re.search(r"(^|\s)#\s*\S", block.code), f"{block.where}: a norun block says why in a # comment"
        if block.language == "python":
            compile(block.code, block.where, "exec")
        else:
            done = subprocess.run(["bash", "-n"], input=block.code, text=True, capture_output=True)
            assert done.returncode == 0, f"{block.where}: {done.stderr}"


def _make_slides(folder: Path) -> None:
    """Two small synthetic 20x slides in slides/ (tests/slide_factory.py) for docs/wsi.md."""
    sys.path.insert(0, str(ROOT / "tests"))
    try:
        from slide_factory import tumour_slide_set
    finally:
        sys.path.remove(str(ROOT / "tests"))
    (folder / "slides").mkdir()
    tumour_slide_set(folder / "slides", n=2)


#: Inputs a page's blocks read that no earlier block writes (user data stood in for by tiny synthetic files).
PREPARE = {"docs/wsi.md": _make_slides}
#: Files a section says its commands write: they must be there after its blocks ran.
WRITTEN = {
    ("README.md", "Quick start on synthetic slides"): (
        "runs/cv/metrics.json", "runs/cv/roc.png", "runs/cv/fold_0/checkpoint/model.safetensors", "predictions.csv",
        "runs/bench/results.csv", "limit.json"),
    ("README.md", "prunelimit: how sparse can a network be pruned"): ("runs/lenet/report.json",),
    ("README.md", "Against other pruning methods"): ("runs/compare/results.csv",),
    ("docs/wsi.md", "1. Tiling"): ("tiles/summary.csv",),
}


def _environment() -> dict[str, str]:
    env = dict(os.environ)
    env.update(PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", MPLBACKEND="Agg")
    return env


def _run(block: Block, cwd: Path) -> tuple[float, str]:
    """Run one block in ``cwd``; the CPU seconds it took and its output's tail (for the failure message)."""
    command = [sys.executable, "-"] if block.language == "python" else ["bash", "-e", "-o", "pipefail", "-s"]
    before = os.times()
    done = subprocess.run(command, input=block.code, text=True, capture_output=True, cwd=cwd, env=_environment(), timeout=900)
    after = os.times()
    output = (done.stdout + done.stderr)[-3000:]
    assert done.returncode == 0, f"{block.where} exited {done.returncode}:\n{block.code}\n--- output ---\n{output}"
    return (after.children_user + after.children_system) - (before.children_user + before.children_system), output


def _runnable(block: Block) -> bool:
    return block.language in ("python", "bash") and not block.norun


RUN_SECTIONS = sorted({(str(b.path.relative_to(ROOT)), b.section) for b in ALL_BLOCKS if _runnable(b)})


def test_every_joined_section_exists():
    """A `same folder as` comment names a heading of its page that has runnable blocks."""
    for block in ALL_BLOCKS:
        page = str(block.path.relative_to(ROOT))
        if _runnable(block):
            assert (page, block.section) in RUN_SECTIONS
    names = {page: {b.section for b in read_blocks(ROOT / page)} for page, _ in RUN_SECTIONS}
    assert all(section in names[page] for page, section in WRITTEN), "WRITTEN names a section no block belongs to"


@pytest.mark.parametrize("page,section", RUN_SECTIONS, ids=[f"{p}#{s}" for p, s in RUN_SECTIONS])
def test_section_blocks_run_in_order(page, section, tmp_path, capsys):
    """A section's python and bash blocks run in one folder, in order, and write the files the section names."""
    if page in PREPARE:
        PREPARE[page](tmp_path)
    spent = []
    for block in read_blocks(ROOT / page):
        if _runnable(block) and block.section == section:
            start = time.monotonic()
            cpu, _ = _run(block, tmp_path)
            spent.append(f"{block.where}: {cpu:.1f} s CPU, {time.monotonic() - start:.1f} s wall")
    missing = [f for f in WRITTEN.get((page, section), ()) if not (tmp_path / f).is_file()]
    assert not missing, f"{page} ({section}): the page says these are written, but they are not: {missing}"
    with capsys.disabled():
        print("\n" + "\n".join(spent))
