"""The chat page (``maemi chat`` / ``make chat``): a Gradio page over a registered MAEMI version.

Upload one or more micrographs, ask a question: the answer streams in token by token (the
model's own generation feeds a streamer), the category scores appear as a bar chart (the
package's category scoring, as ``maemi classify`` computes it), and the version that answered
is named with its alias. When the registered model has a ``challenger`` other than the page's
model, a second column answers the same question with it, side by side.

The page works offline and keeps everything on this host: it binds 127.0.0.1 only, never opens
a share link, sends no analytics, uses system fonts (no web fonts), and uploaded images stay in
Gradio's upload folder on this machine (old uploads are deleted after an hour).

Concurrent users get independent answers: each request has its own reply objects, and loaded
models are shared read-only. No lock is needed around a model: its image conditioning and
deployment rank travel with each call, thread-local (maemi_core/model/gated_cross_attention.py,
dyqlora_fa.py), so requests answered at once get the answers they get alone.
"""

from __future__ import annotations

import os
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

# Before Gradio is imported: no usage statistics or version checks leave this host, and
# nothing is fetched from the Hugging Face Hub.
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import pandas as pd  # noqa: E402

HOST = "127.0.0.1"
IMAGE_TYPES = [".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"]
CHALLENGER = "challenger"
EMPTY_ANSWER = ("(the model generated an empty answer: nothing but end-of-text or whitespace; "
                "try another question)")


# --- which version answers ------------------------------------------------------------------

@dataclass(frozen=True)
class Served:
    """A model URI as the page resolved it: for a registered model, its name, the alias it was
    asked by (if any) and the version that alias points at now."""
    uri: str
    name: Optional[str] = None
    alias: Optional[str] = None
    version: Optional[str] = None

    @property
    def load_uri(self) -> str:
        """The pinned URI: an alias that moves while the page runs does not change a loaded model."""
        return f"models:/{self.name}/{self.version}" if self.name and self.version else self.uri

    def describe(self) -> str:
        if not self.name:
            return f"**{self.uri}**"
        alias = f" @{self.alias}" if self.alias else ""
        return f"**{self.name}** version {self.version}{alias}"


def parse_model_uri(uri: str) -> tuple[Optional[str], Optional[str], Optional[str]]:
    """(name, alias, version) of ``models:/<name>@<alias>`` or ``models:/<name>/<version>``;
    (None, None, None) for any other URI."""
    m = re.fullmatch(r"models:/([^/@]+)@([^/]+)", uri)
    if m:
        return m.group(1), m.group(2), None
    m = re.fullmatch(r"models:/([^/@]+)/(\d+)", uri)
    if m:
        return m.group(1), None, m.group(2)
    return None, None, None


def resolve(uri: str) -> Served:
    """``uri`` with its alias looked up now (LookupError when nothing carries that alias)."""
    from maemi_core.model_registry import alias_version

    name, alias, version = parse_model_uri(uri)
    if name and alias:
        version = alias_version(name, alias)
        if version is None:
            raise LookupError(f"registered model {name!r} has no version with alias {alias!r}")
    return Served(uri, name, alias, version)


def challenger_of(primary: Served) -> Optional[Served]:
    """The registered model's challenger when it is another version than ``primary``."""
    from maemi_core.model_registry import alias_version

    if not primary.name or primary.alias == CHALLENGER:
        return None
    version = alias_version(primary.name, CHALLENGER)
    if version is None or version == primary.version:
        return None
    return Served(f"models:/{primary.name}@{CHALLENGER}", primary.name, CHALLENGER, version)


class ModelCache:
    """Loaded versions by pinned URI. Loading happens once per version (under a lock, so two
    first requests do not load it twice); afterwards the models are only read."""

    def __init__(self):
        self._lock = threading.Lock()
        self._models: dict[str, object] = {}

    def get(self, served: Served):
        from maemi_core.registry.serving import load_registered

        with self._lock:
            if served.load_uri not in self._models:
                self._models[served.load_uri] = load_registered(served.load_uri)
            return self._models[served.load_uri]


# --- one answer -----------------------------------------------------------------------------

@dataclass
class Reply:
    """One column of one request: written by its worker thread, read by that request only."""
    served: Served
    parts: list[str] = field(default_factory=list)      # streamed text, in order
    answer: Optional[str] = None                        # the final answer (decoded once, whole)
    scores: Optional[pd.DataFrame] = None               # category, probability, image
    note: str = ""
    error: Optional[str] = None
    done: threading.Event = field(default_factory=threading.Event)

    def text(self) -> str:
        if self.error:
            return f"error: {self.error}"
        if self.answer is not None:
            return self.answer if self.answer.strip() else EMPTY_ANSWER
        return "".join(self.parts) or "…"


def _streamer(tokenizer, parts: list[str]):
    from transformers import TextStreamer

    class Collect(TextStreamer):
        """Appends each piece of decoded text to ``parts`` (instead of printing it)."""

        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            if text:
                parts.append(text)

    return Collect(tokenizer, skip_prompt=True, skip_special_tokens=True)


def image_labels(paths: list[str]) -> list[str]:
    names = [Path(p).name for p in paths]
    return names if len(set(names)) == len(names) else [f"{i + 1}. {n}" for i, n in enumerate(names)]


def answer(cache: ModelCache, reply: Reply, image_paths: list[str], question: str,
           rank: Optional[int] = None) -> None:
    """Fill ``reply``: the streamed answer, then the category probabilities of each image."""
    from maemi_core.model.generation import generate_answers
    from maemi_core.registry.maemi_pyfunc import with_image_markers
    from maemi_core.registry.serving import category_probabilities, classify_prompt, read_images

    try:
        model = cache.get(reply.served)
        arrays = read_images(model, image_paths)
        prompt = with_image_markers(question, len(arrays))
        reply.answer = generate_answers(model, [prompt], [arrays], max_new_tokens=model.max_new_tokens, rank=rank,
                                        streamer=_streamer(model.tokenizer, reply.parts))[0]
        try:
            classify_prompt(model, reply.served.uri)
        except ValueError as exc:
            reply.note = str(exc)
            return
        classes, scoring, probs = category_probabilities(model, reply.served.uri, arrays, rank)
        labels = image_labels(image_paths)
        several = len(labels) > 1
        reply.scores = pd.DataFrame([{"category": f"{c} ({label})" if several else c, "probability": float(p),
                                      "image": label}
                                     for label, row in zip(labels, probs) for c, p in zip(classes, row)])
        reply.note = f"category scores: {scoring} log-likelihoods, softmax over the categories, per image"
    except Exception as exc:  # shown in the page's column; the page keeps serving
        reply.error = f"{type(exc).__name__}: {exc}"
    finally:
        reply.done.set()


# --- the page -------------------------------------------------------------------------------

def theme():
    """Gradio's base theme with system fonts only (its default theme loads web fonts)."""
    import gradio as gr

    return gr.themes.Base(font=["ui-sans-serif", "system-ui", "sans-serif"],
                          font_mono=["ui-monospace", "SFMono-Regular", "Consolas", "monospace"])


def build(model_uri: str, rank: Optional[int] = None, cache: Optional[ModelCache] = None):
    """The Gradio Blocks of the page over ``model_uri`` (and its challenger, when there is one)."""
    import gradio as gr

    cache = cache or ModelCache()

    def header(served: Optional[Served], role: str) -> str:
        return f"{role}: {served.describe()}" if served else f"{role}: none"

    def describe_models():
        try:
            primary = resolve(model_uri)
        except LookupError as exc:
            return f"Model: {model_uri}: {exc} (run `make demo` to register one)", header(None, "Challenger"), \
                gr.Column(visible=False)
        challenger = challenger_of(primary)
        return (header(primary, "Model"), header(challenger, "Challenger"), gr.Column(visible=challenger is not None))

    def respond(files, question):
        paths = [f if isinstance(f, str) else getattr(f, "name", str(f)) for f in (files or [])]
        if not paths:
            raise gr.Error("Upload at least one micrograph first.")
        if not (question or "").strip():
            raise gr.Error("Ask a question about the micrograph(s).")
        primary = resolve(model_uri)
        challenger = challenger_of(primary)
        replies = [Reply(primary)] + ([Reply(challenger)] if challenger else [])
        workers = [threading.Thread(target=answer, args=(cache, r, paths, question.strip(), rank), daemon=True)
                   for r in replies]
        for w in workers:
            w.start()

        def state():
            first, second = replies[0], (replies[1] if challenger else None)
            return [header(first.served, "Model"), first.text(), first.scores, first.note,
                    gr.Column(visible=second is not None), header(challenger, "Challenger"),
                    second.text() if second else "", second.scores if second else None,
                    second.note if second else ""]

        last = None
        while not all(r.done.is_set() for r in replies):
            now = [(r.text(), r.scores is not None) for r in replies]
            if now != last:
                last = now
                yield state()
            time.sleep(0.05)
        yield state()

    with gr.Blocks(title="MAEMI chat", analytics_enabled=False, delete_cache=(600, 3600)) as page:
        gr.Markdown("## MAEMI: ask about your micrographs\nImages and questions stay on this machine.")
        with gr.Row():
            files = gr.File(label="Micrographs", file_count="multiple", file_types=IMAGE_TYPES, elem_id="images")
            with gr.Column():
                question = gr.Textbox(label="Question", lines=2, placeholder="What does the micrograph show?",
                                      elem_id="question")
                ask = gr.Button("Ask", variant="primary", elem_id="ask")
        with gr.Row(equal_height=False):
            with gr.Column():
                head1 = gr.Markdown(elem_id="model-primary")
                out1 = gr.Textbox(label="Answer", lines=4, interactive=False, elem_id="answer-primary")
                plot1 = gr.BarPlot(x="category", y="probability", color="image", y_lim=[0, 1], sort=None,
                                   label="Category scores", elem_id="scores-primary")
                note1 = gr.Markdown(elem_id="note-primary")
            with gr.Column(visible=False) as col2:
                head2 = gr.Markdown(elem_id="model-challenger")
                out2 = gr.Textbox(label="Answer", lines=4, interactive=False, elem_id="answer-challenger")
                plot2 = gr.BarPlot(x="category", y="probability", color="image", y_lim=[0, 1], sort=None,
                                   label="Category scores", elem_id="scores-challenger")
                note2 = gr.Markdown(elem_id="note-challenger")
        outputs = [head1, out1, plot1, note1, col2, head2, out2, plot2, note2]
        page.load(describe_models, outputs=[head1, head2, col2])
        for trigger in (ask.click, question.submit):
            trigger(respond, inputs=[files, question], outputs=outputs)
    return page


def serve(model_uri: str, port: int = 7860, rank: Optional[int] = None, max_users: int = 4) -> None:
    """Serve the page on http://127.0.0.1:``port`` until interrupted."""
    page = build(model_uri, rank)
    page.queue(default_concurrency_limit=max_users)
    page.launch(server_name=HOST, server_port=port, share=False, inbrowser=False, show_error=True, ssr_mode=False,
                mcp_server=False, pwa=False, enable_monitoring=False, footer_links=["settings"], theme=theme())
