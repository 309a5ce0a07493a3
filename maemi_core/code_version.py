"""Code versions of the assets, derived from the core code they run, so the Dagster UI marks an
asset (and everything downstream) stale after a change to that code, not only after new data,
and a registered model records the code it was trained with.

An asset's code version hashes the source of every ``maemi_core`` module its entry modules
(:data:`ASSET_ENTRIES`, the core modules its Dagster asset calls) can import: the import
closure, found statically with ``ast`` from every ``import maemi_core...`` and
``from maemi_core... import ...`` (relative ones too) at module level or inside functions,
with the ``__init__.py`` of every package on the way (Python runs them on import). A module
reached only by a lazy import inside one branch still counts: the hash follows what can run,
not what ran last time. Data and code a module reads by path rather than imports (the prompt
packs' YAML, the ``evaluate`` metric scripts) sit in folders without an ``__init__.py`` next
to it: every file of those folders under a reached package is hashed too.
"""

from __future__ import annotations

import ast
import hashlib
from functools import lru_cache
from pathlib import Path
from typing import Optional, Union

PACKAGE = "maemi_core"
CORE = Path(__file__).resolve().parent
DATA_SUFFIXES = (".py", ".yaml", ".yml", ".json")

# Per asset, the core modules its Dagster asset calls (maemi_dagster/assets/); everything they
# import is found from there.
ASSET_ENTRIES: dict[str, tuple[str, ...]] = {
    "raw_images": ("data.manifest", "data.preview", "data.sample_groups", "run_isolation"),
    "fab_batch": ("data.incoming",),
    "vit_classifier": ("data.manifest", "vision.classifiers", "run_isolation", "threads"),
    "image_embeddings": ("data.manifest", "vision.embeddings", "run_isolation", "threads"),
    "demonstration_sets": ("data.manifest", "vision.embeddings", "vision.similarity_sampling", "run_isolation"),
    "instruction_set": ("data.manifest", "teacher.instruction_set", "vision.similarity_sampling", "run_isolation"),
    "maemi_model": ("data.manifest", "teacher.instruction_set", "training.instruction_tuning", "run_isolation",
                    "threads"),
    "benchmark_tables": ("data.manifest", "evaluation.benchmark_run", "evaluation.benchmark_tables",
                         "registry.registered_benchmark", "teacher.instruction_set", "run_isolation", "threads"),
    "model_promotion": ("registry.model_promotion",),
    "paper_baseline": ("data.manifest", "vision.paper_baselines.baseline_training", "vision.paper_baselines.paper_tables",
                       "run_isolation", "threads"),
    "paper_tables": ("data.manifest", "vision.paper_baselines.paper_tables", "run_isolation"),
}


def code_version(*assets: str, root: Optional[Union[str, Path]] = None) -> str:
    """sha256 (12 hex digits) over the source of every core module the given assets run (the
    union of their import closures, see the module docstring), e.g. ``code_version("maemi_model")``.
    ``root``: another copy of the ``maemi_core`` package to read (default: this one, hashed once
    per process)."""
    if root is None:
        return _installed(tuple(sorted(set(assets))))
    return _version(Path(root), assets)


@lru_cache(maxsize=None)
def _installed(assets: tuple[str, ...]) -> str:
    return _version(CORE, assets)


def _version(root: Path, assets) -> str:
    if not assets:
        raise ValueError("code_version needs at least one asset name")
    unknown = sorted(set(assets) - set(ASSET_ENTRIES))
    if unknown:
        raise KeyError(f"no entry modules for {unknown}: add them to ASSET_ENTRIES in {__name__}")
    entries = {f"{PACKAGE}.{m}" for a in assets for m in ASSET_ENTRIES[a]}
    h = hashlib.sha256()
    for f in source_files(entries, root):
        h.update(f.relative_to(root).as_posix().encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:12]


def source_files(entries, root: Path = CORE) -> list[Path]:
    """The files behind :func:`import_closure` of ``entries`` (dotted module names): each module's
    source and the data files of the reached packages, sorted."""
    root = Path(root).resolve()
    files: set[Path] = set()
    packages: set[Path] = set()
    for module in import_closure(entries, root):
        path = module_path(module, root)
        files.add(path)
        packages.add(path.parent)
    for package in packages:
        files |= _data_files(package)
    return sorted(files)


def import_closure(entries, root: Path = CORE) -> set[str]:
    """Every ``maemi_core`` module (dotted name) that ``entries`` import, directly or not,
    including themselves and the packages above each."""
    root = Path(root).resolve()
    seen: set[str] = set()
    todo = [m for e in entries for m in _with_parents(e)]
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        path = module_path(module, root)
        for imported in _imports(module, path, root):
            todo.extend(m for m in _with_parents(imported) if m not in seen)
    return seen


def module_path(module: str, root: Path) -> Path:
    """The source file of a dotted ``maemi_core`` module under ``root``."""
    parts = module.split(".")[1:]
    base = root.joinpath(*parts)
    for candidate in (base.with_suffix(".py") if parts else None, base / "__init__.py"):
        if candidate is not None and candidate.is_file():
            return candidate
    raise FileNotFoundError(f"no core module {module} under {root}")


def _is_module(module: str, root: Path) -> bool:
    try:
        module_path(module, root)
        return True
    except FileNotFoundError:
        return False


def _with_parents(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def _imports(module: str, path: Path, root: Path) -> set[str]:
    """The ``maemi_core`` modules one source file imports, anywhere in it."""
    is_package = path.name == "__init__.py"
    package = module if is_package else module.rpartition(".")[0]
    found: set[str] = set()
    for level, name, names in _import_statements(path.read_bytes()):
        if level:
            base_parts = package.split(".")
            if level > 1:
                base_parts = base_parts[: len(base_parts) - (level - 1)]
            base = ".".join(base_parts + ([name] if name else []))
        else:
            base = name
        if not _in_core(base):
            continue
        found.add(base)
        # ``from maemi_core.vision import efficientnet_lite0`` imports a submodule.
        found |= {f"{base}.{n}" for n in names if n != "*" and _is_module(f"{base}.{n}", root)}
    for name in found:
        module_path(name, root)       # an import of a missing core module is an error, not a skip
    return found


@lru_cache(maxsize=512)
def _import_statements(source: bytes) -> tuple[tuple[int, str, tuple[str, ...]], ...]:
    """(level, module, imported names) of every import statement in a source, at any depth;
    ``import a.b`` gives (0, "a.b", ()). Cached by content: several assets share modules."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [(0, alias.name, ()) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            out.append((node.level, node.module or "", tuple(alias.name for alias in node.names)))
    return tuple(out)


def _in_core(name: str) -> bool:
    return name == PACKAGE or name.startswith(PACKAGE + ".")


def _data_files(package: Path) -> set[Path]:
    """Files a package's modules read by path: everything with a source or data suffix in its
    sub-folders that are not packages themselves (recursively, stopping at packages)."""
    out: set[Path] = set()
    for sub in package.iterdir():
        if sub.is_dir() and sub.name != "__pycache__" and not (sub / "__init__.py").is_file():
            out |= {f for f in sub.iterdir() if f.is_file() and f.suffix in DATA_SUFFIXES}
            out |= _data_files(sub)
    return out
