"""What a teacher is asked and what it answers; the prompt as it travels over the wire.

A :class:`TeacherRequest` has two audiences. The *student prompt* (``question``) is what the
small model will later see in the instruction record: just the images and the question.
The *teacher prompt* adds what the dataset already knows (category, pixel size and the
acquisition metadata of ``teacher.acquisition_metadata``; never manifest bookkeeping such as
ids, hashes or splits) and which aspects the answer should ground itself in, so that a large
vision-language model answers consistently with the labels, and the on-prem measurement
teacher knows what to measure. Both teachers receive the same teacher prompt; :func:`parse_teacher_prompt`
reads it back (the teacher server uses it).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional, Protocol

# Part of an external teacher's identity (and so of every cache key): bumped when what the teacher
# prompt states changes. 2: each image's line carries only its acquisition metadata.
PROMPT_FORMAT = "2"

TASKS = ("caption", "vqa", "classify_zero_shot", "classify_few_shot", "intra_dissimilar", "inter_similar",
         "heterogeneity")


@dataclass(frozen=True)
class ImageRef:
    image_id: str
    path: str
    label: Optional[str] = None          # known to the teacher; None for the query of a classification
    crop_bottom: int = 0
    pixel_size_nm: Optional[float] = None
    metadata: tuple[tuple[str, str], ...] = ()


@dataclass
class TeacherRequest:
    task: str
    question: str                         # the student prompt (no grounding)
    images: list[ImageRef]
    facts: list[str]
    system: str
    technique: str
    subject: str
    query_label: Optional[str] = None     # the true category of the query image (classification tasks)
    categories: list[str] = field(default_factory=list)
    length: str = "detailed"              # paper A.7: "concise" or "detailed" answer to the same question


@dataclass
class TeacherAnswer:
    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    attempts: int = 1


class Teacher(Protocol):
    name: str

    def identity(self) -> dict:
        """Everything that changes the answers (model, parameters); never secrets."""

    def answer(self, request: TeacherRequest) -> TeacherAnswer: ...


# --- the teacher prompt -------------------------------------------------------------------

_KNOWN = "Known from the dataset (do not contradict):"
_FOCUS = "Ground the answer in:"
_TASK = "Task:"
_TECH = "Imaging technique:"
_SUBJECT = "Subject:"
_TRUE = "True category of the last image:"
_CATS = "Categories:"
_LENGTH = "Answer length:"
CONCISE_INSTRUCTION = "concise: one short sentence that states the key finding (for classification: the category only)"


def _image_line(i: int, ref: ImageRef) -> str:
    parts = [f"category = {ref.label}" if ref.label else "category = (to be determined)"]
    parts.append(f"pixel size = {ref.pixel_size_nm:g} nm" if ref.pixel_size_nm else "pixel size = unknown")
    parts += [f"{k} = {v}" for k, v in ref.metadata]
    return f"- image {i}: " + "; ".join(parts)


def render_teacher_prompt(req: TeacherRequest) -> str:
    lines = [req.question, "", f"{_TASK} {req.task}", f"{_TECH} {req.technique}", f"{_SUBJECT} {req.subject}"]
    if req.categories:
        lines.append(f"{_CATS} {' | '.join(req.categories)}")
    if req.query_label:
        lines.append(f"{_TRUE} {req.query_label} (answer consistently with it; the student will not see it)")
    lines.append(_KNOWN)
    lines += [_image_line(i + 1, ref) for i, ref in enumerate(req.images)]
    lines.append(f"{_FOCUS} {', '.join(req.facts)}")
    if req.length == "concise":   # detailed prompts stay as they were: their cached answers stay valid
        lines.append(f"{_LENGTH} {CONCISE_INSTRUCTION}")
    return "\n".join(lines)


@dataclass
class ParsedPrompt:
    task: str
    question: str
    technique: str
    subject: str
    facts: list[str]
    labels: list[Optional[str]]
    pixel_sizes: list[Optional[float]]
    metadata: list[dict[str, str]]
    query_label: Optional[str]
    categories: list[str]
    length: str = "detailed"


def parse_teacher_prompt(text: str) -> ParsedPrompt:
    """Inverse of :func:`render_teacher_prompt` (raises ValueError on anything else)."""
    if _KNOWN not in text or _TASK not in text:
        raise ValueError("not a MAEMI teacher prompt (no 'Task:' / known-facts block)")
    question, _, rest = text.partition(f"\n\n{_TASK} ")
    lines = (f"{_TASK} " + rest).splitlines()
    get = {ln.split(":", 1)[0] + ":": ln.split(":", 1)[1].strip() for ln in lines if ":" in ln and not ln.startswith("- ")}
    labels, sizes, metas = [], [], []
    for ln in lines:
        m = re.match(r"- image (\d+): (.*)$", ln)
        if not m:
            continue
        fields = dict(p.split(" = ", 1) for p in m.group(2).split("; ") if " = " in p)
        cat = fields.pop("category", None)
        labels.append(None if cat in (None, "(to be determined)") else cat)
        ps = fields.pop("pixel size", "unknown")
        sizes.append(None if ps == "unknown" else float(ps.split()[0]))
        metas.append(fields)
    true = get.get(_TRUE)
    return ParsedPrompt(
        task=get[_TASK], question=question.strip(), technique=get.get(_TECH, ""), subject=get.get(_SUBJECT, "image"),
        facts=[f.strip() for f in get.get(_FOCUS, "").split(",") if f.strip()],
        labels=labels, pixel_sizes=sizes, metadata=metas,
        query_label=true.split(" (")[0] if true else None,
        categories=[c.strip() for c in get.get(_CATS, "").split("|") if c.strip()],
        length="concise" if get.get(_LENGTH, "").startswith("concise") else "detailed",
    )
