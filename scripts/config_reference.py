"""Write docs/configuration_reference.md from the profile's pydantic models in maemi_core/config.py.

    .venv/bin/python scripts/config_reference.py            # rewrite the page
    .venv/bin/python scripts/config_reference.py --check    # exit 1 when the page is out of date

Every key of a profile, with its type, its default and the comment written beside it in the
code, generated from the source so the page cannot drift from what the loader accepts
(``tests/test_config.py`` runs ``--check``).
"""

from __future__ import annotations

import argparse
import ast
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "maemi_core" / "config.py"
PAGE = ROOT / "docs" / "configuration_reference.md"
TOP = "MaemiConfig"
SKIP = {"config_name", "config_path", "project_root"}          # filled in by the loader, not read from YAML


def _comments(lines: list[str], node: ast.AST) -> str:
    """The comment lines right above a field and the comment at the end of its line(s)."""
    above = []
    i = node.lineno - 2
    while i >= 0 and lines[i].strip().startswith("#"):
        above.insert(0, lines[i].strip().lstrip("#").strip())
        i -= 1
    trailing = []
    for j in range(node.lineno - 1, node.end_lineno):
        code = lines[j]
        m = re.search(r"\s#\s?(.*)$", code)
        if m and code.count('"') % 2 == 0 and code.count("'") % 2 == 0:
            trailing.append(m.group(1).strip())
    return " ".join(above + trailing)


def _default(src: str, node: ast.AnnAssign) -> str:
    if node.value is None:
        return "(required)"
    value = node.value
    if isinstance(value, ast.Call) and getattr(value.func, "id", "") == "Field":
        for kw in value.keywords:
            if kw.arg == "default_factory":
                body = kw.value.body if isinstance(kw.value, ast.Lambda) else kw.value
                return ast.get_source_segment(src, body)
        if value.args:
            return ast.get_source_segment(src, value.args[0])
        return "(required)"
    return ast.get_source_segment(src, value)


def models(src: str) -> dict[str, list[dict]]:
    """Class name -> its fields (name, annotation, default, comment), in source order."""
    tree = ast.parse(src)
    lines = src.splitlines()
    out: dict[str, list[dict]] = {}
    for node in tree.body:
        if not isinstance(node, ast.ClassDef):
            continue
        fields = []
        for item in node.body:
            if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name) \
                    and not item.target.id.startswith("_") and item.target.id not in SKIP:
                fields.append({"name": item.target.id, "type": ast.get_source_segment(src, item.annotation),
                               "default": _default(src, item), "comment": _comments(lines, item)})
        out[node.name] = fields
    return out


def _nested(annotation: str, classes: dict) -> str | None:
    for name in re.findall(r"[A-Za-z_]\w*", annotation):
        if name in classes and name != TOP and classes[name]:
            return name
    return None


def rows(classes: dict, cls: str, prefix: str = "") -> list[tuple[str, str, str, str]]:
    out = []
    for f in classes[cls]:
        key = f"{prefix}{f['name']}"
        inner = _nested(f["type"], classes)
        if inner and not f["type"].startswith(("list", "dict")):
            if f["comment"]:
                out.append((key, f["type"], "", f["comment"]))
            out += rows(classes, inner, key + ".")
        else:
            out.append((key, f["type"], f["default"], f["comment"]))
    return out


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render() -> str:
    src = SOURCE.read_text()
    classes = models(src)
    parts = ["# Configuration reference", "",
             "Every key of a profile (`configs/*.yaml`, chosen by `MAEMI_CONFIG`), generated from "
             "`maemi_core/config.py` by `scripts/config_reference.py` (a test fails when this page is out of "
             "date). Types and defaults are as the loader reads them; the text is the comment beside the field "
             "in the code. What the settings do, stage by stage: [configuration.md](configuration.md).", ""]
    for f in classes[TOP]:
        inner = _nested(f["type"], classes)
        parts += [f"## `{f['name']}`", ""]
        if f["comment"]:
            parts += [f["comment"], ""]
        if not inner:
            parts += [f"Type `{_cell(f['type'])}`, default `{_cell(f['default'])}`.", ""]
            continue
        parts += ["| key | type | default | notes |", "|---|---|---|---|"]
        for key, typ, default, note in rows(classes, inner, f["name"] + "."):
            parts.append(f"| `{key}` | `{_cell(typ)}` | {'`' + _cell(default) + '`' if default else ''} | "
                         f"{_cell(note)} |")
        parts.append("")
    return "\n".join(parts).rstrip() + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="exit 1 when the page differs from the source")
    args = ap.parse_args()
    page = render()
    if args.check:
        if not PAGE.is_file() or PAGE.read_text() != page:
            print(f"{PAGE.relative_to(ROOT)} is out of date: run scripts/config_reference.py", file=sys.stderr)
            return 1
        return 0
    PAGE.write_text(page)
    print(f"wrote {PAGE.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
