"""Answers from the MAEMI model: batched greedy or sampled decoding with a KV cache, and the
likelihood of candidate answers (category names) for classification.

The visual tokens of each prompt are computed once, before decoding; every decoding step
reuses them and the LM's key/value cache, so a step costs one token's worth of LM compute
plus the cross-attention of that token. The deployment rank of a call applies to that call
only: it is restored afterwards.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch

from maemi_core.model.dyqlora_fa import call_rank, dylora_layers
from maemi_core.model.gated_cross_attention import media_attention_mask
from maemi_core.model.maemi_model import MaemiModel
from maemi_core.model.prompts import prompt_ids


@dataclass(frozen=True)
class DecodingConfig:
    """Controls against greedy decoding's loops (a sentence repeated until the token budget
    ends). The same settings apply to every method of a table."""
    repetition_penalty: float = 1.0     # > 1 down-weights tokens already in the prompt or answer (CTRL)
    no_repeat_ngram_size: int = 0       # > 0: never repeat an n-gram of this length


@contextmanager
def deploy_rank(model: MaemiModel, rank: Optional[int]):
    """The adapters at ``rank`` for this call (this thread) only; the model is not changed."""
    if rank is not None:
        layers = dylora_layers(model)
        if layers and not layers[0].r_min <= rank <= layers[0].r_max:
            raise ValueError(f"rank {rank} outside the trained range [{layers[0].r_min}, {layers[0].r_max}]")
    with call_rank(rank):
        yield


def _left_padded(model: MaemiModel, questions: list[str], images: list[list[np.ndarray]], plain: bool,
                 media: Optional[torch.Tensor] = None):
    tok = model.tokenizer
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    ids = [prompt_ids(tok, q, plain=plain) for q in questions]
    t = max(len(i) for i in ids)
    input_ids = torch.full((len(ids), t), pad_id, dtype=torch.long)
    attn = torch.zeros((len(ids), t), dtype=torch.long)
    for i, row in enumerate(ids):
        input_ids[i, t - len(row):] = torch.tensor(row)
        attn[i, t - len(row):] = 1
    if plain:
        return input_ids, attn, None, pad_id
    if media is not None:                          # visual tokens computed by the caller (a memo)
        return input_ids, attn, media, pad_id
    return input_ids, attn, _encode_prompt_images(model, images), pad_id


def _encode_prompt_images(model: MaemiModel, images: list[list[np.ndarray]]) -> Optional[torch.Tensor]:
    """(B, M, N, V) visual tokens of each prompt's images, zero-padded to the most images of any
    prompt; None when no prompt has an image. Once per prompt, not per decoding step."""
    m = max((len(x) for x in images), default=0)
    if not m:
        return None
    size = model.cfg.image_size
    imgs = torch.zeros((len(images), m, 3, size, size), dtype=torch.uint8)
    for i, arrs in enumerate(images):
        for j, a in enumerate(arrs):
            imgs[i, j] = torch.from_numpy(np.asarray(a))
    return model.encode_images(imgs)


@torch.no_grad()
def generate_answers(model: MaemiModel, questions: list[str], images: list[list[np.ndarray]],
                     max_new_tokens: int = 96, do_sample: bool = False, temperature: float = 0.7,
                     top_p: float = 0.9, rank: Optional[int] = None, seed: int = 0,
                     token_counts: Optional[list[int]] = None, plain: bool = False,
                     decoding: DecodingConfig = DecodingConfig(),
                     media: Optional[torch.Tensor] = None, streamer=None) -> list[str]:
    """``questions[i]`` holds one ``<image>`` per array in ``images[i]`` ((3, S, S) uint8 each),
    or ``media`` holds their visual tokens already ((B, M, N, V), zero-padded; ``images`` unused).
    ``token_counts``, when given, is extended with the number of tokens generated per answer
    (up to and including end-of-sequence), for throughput figures. ``plain``: prompt without
    image markers, ``<Encode>`` or images (the LM as it ships). ``streamer``: a transformers
    streamer (e.g. ``TextStreamer``) fed the tokens as they are generated; one prompt only."""
    model.eval()
    tok = model.tokenizer
    input_ids, attn, media, pad_id = _left_padded(model, questions, images, plain, media)
    t = input_ids.shape[1]
    mask = None if media is None else media_attention_mask(model.image_positions(input_ids, media.shape[1]), t,
                                                           media.shape[1])
    if do_sample:
        torch.manual_seed(seed)
    extra = {}
    if decoding.repetition_penalty != 1.0:
        extra["repetition_penalty"] = decoding.repetition_penalty
    if decoding.no_repeat_ngram_size:
        extra["no_repeat_ngram_size"] = decoding.no_repeat_ngram_size
    if streamer is not None:
        extra["streamer"] = streamer
    with deploy_rank(model, rank):
        model.condition(media, mask)
        try:
            # Only embeddings go in (the image tokens are ours), so the repetition controls see the
            # answer's own tokens: they stop the answer repeating itself, not quoting the question.
            out = model.lm.generate(inputs_embeds=model.embed(input_ids), attention_mask=attn,
                                    max_new_tokens=max_new_tokens, do_sample=do_sample,
                                    temperature=temperature if do_sample else None, top_p=top_p if do_sample else None,
                                    top_k=None, pad_token_id=pad_id, eos_token_id=tok.eos_token_id, use_cache=True,
                                    **extra)
        finally:
            model.condition(None, None)
    if token_counts is not None:
        for row in out:
            ends = (row == tok.eos_token_id).nonzero().flatten()
            token_counts.append(int(ends[0]) + 1 if len(ends) else len(row))
    return [tok.decode(row, skip_special_tokens=True).strip() for row in out]


def shared_prefix_length(rows: list[list[int]], image_token_id: int) -> int:
    """Tokens at the start of every row that no image can affect: the rows' common prefix, up to
    (not including) the first ``<image>`` of any row, leaving at least one token per row. Their
    keys and values are the same for every prompt (the chat template's system turn), so they can
    be computed once for a batch."""
    if not rows:
        return 0
    limit = min(len(r) for r in rows) - 1
    n = 0
    first = rows[0]
    while n < limit and first[n] != image_token_id and all(r[n] == first[n] for r in rows):
        n += 1
    return n


@torch.no_grad()
def candidate_log_likelihoods(model: MaemiModel, questions: list[str], images: list[list[np.ndarray]],
                              candidates: list[str], rank: Optional[int] = None, plain: bool = False,
                              batch_size: int = 8,
                              media_of: Optional[Callable[[int, int], Optional[torch.Tensor]]] = None,
                              return_hidden: bool = False):
    """(len(questions), len(candidates)) summed log-probability of each candidate as the start of
    the answer: the model's ranking of the categories (top-1/top-k on every test image), from the
    same prompt as :func:`generate_answers`. The prompt is run once per question with the KV
    cache, which is then shared by the candidates: the cost is one prompt plus a few tokens per
    candidate, not one prompt per candidate. The batch's common prefix before any image (the
    system turn, about a fifth of a zero-shot prompt) runs once per batch, not once per row.
    ``media_of(start, stop)``, when given, returns the visual tokens of questions ``start:stop``
    (from a memo) instead of encoding ``images``. ``return_hidden``: also return the
    (len(questions), D) final hidden state at the answer's first position (the state the
    language-model head reads the first answer token from; the ``head`` category scoring's input)."""
    model.eval()
    tok = model.tokenizer
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    cand_ids = [tok(c, add_special_tokens=False)["input_ids"] for c in candidates]
    n_c, l_c = len(cand_ids), max(len(c) for c in cand_ids)
    out = np.zeros((len(questions), n_c), dtype=np.float64)
    states: list[np.ndarray] = []
    with deploy_rank(model, rank):
        for start in range(0, len(questions), batch_size):
            qs, ims = questions[start:start + batch_size], images[start:start + batch_size]
            rows = [prompt_ids(tok, q, plain=plain) for q in qs]
            n_pre = shared_prefix_length(rows, model.image_token_id)
            media = None
            if not plain:
                media = media_of(start, start + len(qs)) if media_of is not None else None
                if media is None:
                    media = _encode_prompt_images(model, ims)
            b = len(rows)
            t = max(len(r) for r in rows) - n_pre
            ids = torch.full((b, t), pad_id, dtype=torch.long)          # the rows after the prefix, left-padded
            rest_attn = torch.zeros((b, t), dtype=torch.long)
            for i, row in enumerate(rows):
                ids[i, t - len(row) + n_pre:] = torch.tensor(row[n_pre:])
                rest_attn[i, t - len(row) + n_pre:] = 1
            attn = torch.cat([torch.ones((b, n_pre), dtype=torch.long), rest_attn], dim=1)   # [prefix][pad][rest]
            pos = (attn.cumsum(-1) - 1).clamp(min=0)
            mask = None
            if media is not None:   # candidate tokens see the last image, like the answer would
                mask = media_attention_mask(model.image_positions(ids, media.shape[1]), t + l_c, media.shape[1])
            try:
                cache = None
                if n_pre:
                    # The prefix precedes every image: its states are the same for every row (the
                    # gated blocks' feed-forward still applies to it, so it runs with them, no image).
                    if media is not None:
                        model.condition(media[:1], torch.zeros((1, n_pre, media.shape[1]), dtype=torch.bool))
                    cache = model.lm.model(inputs_embeds=model.embed(torch.tensor([rows[0][:n_pre]])),
                                           position_ids=pos[:1, :n_pre], use_cache=True).cache
                    cache.batch_repeat_interleave(b)
                model.condition(media, None if mask is None else mask[:, :t])
                res = model.lm.model(inputs_embeds=model.embed(ids), attention_mask=attn, position_ids=pos[:, n_pre:],
                                     cache=cache, use_cache=True)
                if return_hidden:
                    states.append(res.last_hidden_state[:, -1].float().numpy())
                first = torch.log_softmax(model.lm.lm_head(res.last_hidden_state[:, -1]).float()[:, : model.base_vocab],
                                          dim=-1)                                          # (b, V)
                # The candidates of a prompt run side by side in its row (not as n_c copies of the
                # row: repeating the prompt's cache cost a third of the pass), each at the
                # positions after the prompt, seeing the prompt and its own earlier tokens only.
                n_k = attn.shape[1]
                cand = torch.full((b, n_c * l_c), pad_id, dtype=torch.long)
                for i in range(b):
                    for j, c in enumerate(cand_ids):
                        cand[i, j * l_c: j * l_c + len(c)] = torch.tensor(c)
                cand_pos = (pos[:, -1:] + 1 + torch.arange(l_c).repeat(n_c)[None]).expand(b, -1)
                own = torch.arange(n_c).repeat_interleave(l_c)
                step = torch.arange(l_c).repeat(n_c)
                block = (own[:, None] == own[None, :]) & (step[None, :] <= step[:, None])    # (n_c*l_c, n_c*l_c)
                full_attn = torch.cat([attn.bool()[:, None, None, :].expand(b, 1, n_c * l_c, n_k),
                                       block[None, None].expand(b, 1, -1, -1)], dim=-1)
                if media is not None:   # the candidates see the last image, like the answer would
                    model.remask(mask[:, t + step])
                hid = model.lm.model(inputs_embeds=model.embed(cand), attention_mask=full_attn,
                                     position_ids=cand_pos, cache=res.cache, use_cache=True).last_hidden_state
                # One (b*C*(L-1), D) x (D, V) product: on the strided 3-D slice torch ran a batched
                # product that copies the vocabulary matrix once per row of the batch.
                hid = hid.reshape(b * n_c, l_c, -1)[:, :-1].reshape(-1, hid.shape[-1])
                rest = torch.log_softmax(model.lm.lm_head(hid).float()[:, : model.base_vocab], dim=-1)
                rest = rest.view(b * n_c, l_c - 1, rest.shape[-1])
            finally:
                model.condition(None, None)
            for i in range(b):
                for j, c in enumerate(cand_ids):
                    row = i * n_c + j
                    lp = float(first[i, c[0]])
                    for k in range(1, len(c)):
                        lp += float(rest[row, k - 1, c[k]])
                    out[start + i, j] = lp
    if return_hidden:
        return out, (np.concatenate(states) if states else np.zeros((0, model.lm.config.hidden_size), np.float32))
    return out
