"""Prompt packs: versioned YAML files of teacher prompts, one per kind of data.

Format: ``prompt_packs/README.md``. ``dataset.prompt_pack`` names a shipped pack
(``sem``, ``defects``, ``elpv``) or gives the path of a site's own ``.yaml`` file.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from maemi_core.config import ConfigError

PACKS_DIR = Path(__file__).resolve().parent / "prompt_packs"

FACTS = (
    "label", "technique", "scale", "metadata", "intensity", "particles", "porosity", "orientation", "edges",
    "texture", "uniformity", "phases", "boundaries", "dark_regions", "line_features", "unmeasurable",
    "morphology", "beads",
)
_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Grounded(_Strict):
    facts: list[str]

    @field_validator("facts")
    @classmethod
    def _known_facts(cls, v: list[str]) -> list[str]:
        unknown = [f for f in v if f not in FACTS]
        if unknown or not v:
            raise ValueError(f"facts must be a non-empty subset of {FACTS}; unknown: {unknown}")
        return v


class CaptionSpec(_Grounded):
    prompts: list[str]


class Question(_Grounded):
    id: str
    text: str


class Family(_Strict):
    family: str
    id: str
    questions: list[Question]


class Template(_Grounded):
    text: str

    def render(self, **values) -> str:
        return self.text.format(**values)


def _template(required: tuple[str, ...]):
    class _T(Template):
        @model_validator(mode="after")
        def _placeholders(self):
            found = set(_PLACEHOLDER.findall(self.text))
            missing = set(required) - found
            if missing:
                raise ValueError(f"template must contain {{{'}, {'.join(sorted(missing))}}}")
            allowed = {"categories", "k", "n", "label", "labels"}
            if found - allowed:
                raise ValueError(f"unknown placeholders {sorted(found - allowed)}; allowed: {sorted(allowed)}")
            return self
    return _T


ZeroShot = _template(("categories",))
FewShot = _template(("k", "categories"))
GroupOne = _template(("n", "label"))
GroupMany = _template(("n", "labels"))


class PromptPack(_Strict):
    name: str
    version: str
    description: str
    technique: str
    subject: str
    system: str
    caption: CaptionSpec
    vqa: list[Family]
    classify_zero_shot: ZeroShot
    classify_few_shot: FewShot
    intra_dissimilar: GroupOne
    inter_similar: GroupMany
    heterogeneity: GroupOne

    @model_validator(mode="after")
    def _unique_ids(self) -> "PromptPack":
        ids = [q.id for f in self.vqa for q in f.questions]
        if len(ids) != len(set(ids)):
            raise ValueError("question ids must be unique within a pack")
        return self

    def questions(self) -> list[tuple[Family, Question]]:
        return [(f, q) for f in self.vqa for q in f.questions]


def load_prompt_pack(name_or_path: str, base: Optional[Path] = None) -> PromptPack:
    """A shipped pack by name, or a site's pack by path (relative to ``base``)."""
    candidate = Path(name_or_path)
    if candidate.suffix in (".yaml", ".yml"):
        path = candidate if candidate.is_absolute() or base is None else base / candidate
    else:
        path = PACKS_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        shipped = sorted(p.stem for p in PACKS_DIR.glob("*.yaml"))
        raise ConfigError(f"prompt pack {name_or_path!r} not found ({path}); dataset.prompt_pack must be one of "
                          f"{shipped} or the path of a .yaml pack (format: {PACKS_DIR / 'README.md'})")
    try:
        return PromptPack(**yaml.safe_load(path.read_text()))
    except (ValidationError, TypeError, yaml.YAMLError) as exc:
        raise ConfigError(f"prompt pack {path} is invalid:\n{exc}") from exc
