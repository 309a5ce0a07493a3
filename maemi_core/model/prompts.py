"""The student prompt (paper Figure 2): one ``<image>`` marker per image, the question, closed by
``<Encode>``, in the LM's chat template. One module that the model, training, the benchmark,
``maemi ask`` / ``classify``, the chat page and the served model all build prompts with."""

from __future__ import annotations

IMAGE_TOKEN = "<image>"
ENCODE_TOKEN = "<Encode>"


def prompt_ids(tokenizer, human: str, plain: bool = False) -> list[int]:
    """The student prompt in the LM's chat template, closed by <Encode> (paper Figure 2).
    ``plain``: the prompt the LM as it ships can read, without the ``<image>`` markers and
    ``<Encode>`` it has never seen (the untuned ``base_lm`` row)."""
    if plain:
        text = " ".join(human.replace(IMAGE_TOKEN, " ").split())
        msgs = [{"role": "user", "content": text}]
        return list(tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=False))
    msgs = [{"role": "user", "content": f"{human} {ENCODE_TOKEN}"}]
    return list(tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=False))


def with_image_markers(question: str, n_images: int) -> str:
    """The question as the model is asked it: one ``<image>`` per image in front, unless the
    question places its own markers."""
    return question if IMAGE_TOKEN in question else IMAGE_TOKEN * n_images + "\n" + question
