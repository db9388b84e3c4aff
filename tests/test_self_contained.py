"""The repository is self-contained: code cites its own ``docs/`` pages, never documents a clone lacks.

Sources once cited as ``../shared/reference/<page>.md`` (or just ``vllm.md s.8``) and ``../shared/seeds/...``
(``seed 002``) now live, restated with their public sources, under ``docs/``; every
``docs/<page>.md#<anchor>`` cited anywhere must name a page and a section heading that exist. The measured
traces are data, not documents: tests read them through ``$MASLAT_TRACES_DIR`` and the README says where CI
puts them, which is allowed.
"""

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

#: files exempt from the check (none: every citation points into docs/)
ALLOWED: set[str] = set()
ALLOWED_PREFIXES: tuple[str, ...] = ()

PAGES = r"(?:vllm|lamas|latency_physics|system_aware|real_vllm_cpu)\.md"
#: ``../shared/reference`` or ``../shared/seeds``; a reference page not under ``docs/``; a seed by number
FORBIDDEN = re.compile(rf"shared/(?:reference|seeds)|(?<![\w/]){PAGES}|\bseeds? 00\d\b")
CITATION = re.compile(r"docs/(\w+\.md)#([\w-]+)")


def _tracked() -> list[str]:
    try:
        out = subprocess.run(["git", "ls-files", "*.py", "*.ipynb", "*.md"], cwd=ROOT, capture_output=True,
                             text=True, check=True).stdout
        return out.split()
    except (OSError, subprocess.CalledProcessError):  # an unpacked source tree: walk it instead
        return [str(p.relative_to(ROOT)) for ext in ("py", "ipynb", "md") for p in ROOT.rglob(f"*.{ext}")
                if not {".venv", "build", ".git"} & set(p.relative_to(ROOT).parts)]


def _slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _checked() -> list[str]:
    me = str(Path(__file__).relative_to(ROOT))
    return [f for f in _tracked() if f != me and f not in ALLOWED and not f.startswith(ALLOWED_PREFIXES)
            and not f.startswith("docs/")]


def test_no_citation_of_documents_outside_the_repository():
    bad = [f"{f}:{n}: {line.strip()[:120]}" for f in _checked()
           for n, line in enumerate((ROOT / f).read_text(encoding="utf-8").splitlines(), 1)
           if FORBIDDEN.search(line)]
    assert not bad, ("cite docs/<page>.md#<section> instead of the shared reference documents or seeds:\n"
                     + "\n".join(bad))


def test_every_docs_citation_names_an_existing_section():
    anchors = {p.name: {_slug(m) for m in re.findall(r"^#+ (.+)$", p.read_text(encoding="utf-8"), re.M)}
               for p in (ROOT / "docs").glob("*.md")}
    assert {"vllm.md", "latency_physics.md", "lamas.md", "system_aware.md"} <= set(anchors)
    cited = [(f, page, anchor) for f in _tracked() for page, anchor in CITATION.findall((ROOT / f).read_text(
        encoding="utf-8"))]
    assert len(cited) >= 40  # the code does cite them
    broken = [f"{f}: docs/{page}#{anchor}" for f, page, anchor in cited
              if anchor not in anchors.get(page, ())]
    assert not broken, "citations of sections that do not exist:\n" + "\n".join(broken)


def test_docs_pages_name_public_sources():
    for page in ("vllm.md", "latency_physics.md", "lamas.md", "system_aware.md"):
        text = (ROOT / "docs" / page).read_text(encoding="utf-8")
        assert len(re.findall(r"https://", text)) >= 3, page
        assert "shared/" not in text, page
