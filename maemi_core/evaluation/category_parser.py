"""Reading a category out of a free-text classification answer.

The student is asked to name one category first, but a generated answer can be messy:
different case, spaces or hyphens for underscores, markdown, a preamble ("The cell is likely
defective."), or a category that is the suffix of another ("defective" inside "possibly
defective"). The rule: the category mentioned *first* wins; at the same position the longest
name wins; a mention directly negated ("not defective") does not count. No mention at all
returns None, which the benchmark counts as a wrong answer (and reports how many).
"""

from __future__ import annotations

import re
from typing import Optional

_NEGATION = re.compile(r"\b(?:not|no|non|isn't|is not|never)\s*$")


def _normal(text: str) -> str:
    return re.sub(r"[\s_\-]+", " ", re.sub(r"[*`#>\"']", " ", text.lower())).strip()


def parse_category(answer: str, class_names: list[str]) -> Optional[str]:
    text = _normal(answer)
    best: Optional[tuple[int, int, str]] = None   # (position, -length, name)
    for name in class_names:
        pattern = re.compile(r"(?<![a-z0-9])" + re.escape(_normal(name)) + r"(?![a-z0-9])")
        for m in pattern.finditer(text):
            if _NEGATION.search(text[: m.start()]):
                continue
            key = (m.start(), -len(m.group(0)), name)
            if best is None or key < best:
                best = key
            break
    return best[2] if best else None
