"""Answers from the MAEMI model: batched greedy or sampled decoding with a KV cache.

The visual tokens of each prompt are computed once, before decoding; every decoding step
reuses them and the LM's key/value cache, so a step costs one token's worth of LM compute
plus the cross-attention of that token.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from maemi_core.model.dyqlora_fa import set_deploy_rank
from maemi_core.model.gated_cross_attention import media_attention_mask
from maemi_core.model.maemi_model import MaemiModel
from maemi_core.training.maemi_training import prompt_ids


@torch.no_grad()
def generate_answers(model: MaemiModel, questions: list[str], images: list[list[np.ndarray]],
                     max_new_tokens: int = 96, do_sample: bool = False, temperature: float = 0.7,
                     top_p: float = 0.9, rank: Optional[int] = None, seed: int = 0,
                     token_counts: Optional[list[int]] = None) -> list[str]:
    """``questions[i]`` holds one ``<image>`` per array in ``images[i]`` ((3, S, S) uint8 each).
    ``token_counts``, when given, is extended with the number of tokens generated per answer
    (up to and including end-of-sequence), for throughput figures."""
    if rank is not None:
        set_deploy_rank(model, rank)
    model.eval()
    tok = model.tokenizer
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    ids = [prompt_ids(tok, q) for q in questions]
    t = max(len(i) for i in ids)
    m = max(1, max(len(x) for x in images))
    size = model.cfg.image_size
    input_ids = torch.full((len(ids), t), pad_id, dtype=torch.long)
    attn = torch.zeros((len(ids), t), dtype=torch.long)
    imgs = torch.zeros((len(ids), m, 3, size, size), dtype=torch.uint8)
    for i, (row, arrs) in enumerate(zip(ids, images)):
        input_ids[i, t - len(row):] = torch.tensor(row)       # left padding for decoding
        attn[i, t - len(row):] = 1
        for j, a in enumerate(arrs):
            imgs[i, j] = torch.from_numpy(np.asarray(a))
    media = model.encode_images(imgs)                                          # once per prompt
    mask = media_attention_mask(model.image_positions(input_ids, m), t, m)
    model.condition(media, mask)
    if do_sample:
        torch.manual_seed(seed)
    try:
        out = model.lm.generate(inputs_embeds=model.embed(input_ids), attention_mask=attn,
                                max_new_tokens=max_new_tokens, do_sample=do_sample,
                                temperature=temperature if do_sample else None, top_p=top_p if do_sample else None,
                                top_k=None, pad_token_id=pad_id, eos_token_id=tok.eos_token_id, use_cache=True)
    finally:
        model.condition(None, None)
    if token_counts is not None:
        for row in out:
            ends = (row == tok.eos_token_id).nonzero().flatten()
            token_counts.append(int(ends[0]) + 1 if len(ends) else len(row))
    return [tok.decode(row, skip_special_tokens=True).strip() for row in out]


@torch.no_grad()
def candidate_log_likelihoods(model: MaemiModel, questions: list[str], images: list[list[np.ndarray]],
                              candidates: list[str], rank: Optional[int] = None) -> np.ndarray:
    """(len(questions), len(candidates)) summed log-probability of each candidate as the start of
    the answer: a ranking of the categories for top-k accuracy, from the same model and prompt
    as :func:`generate_answers` (the visual tokens are computed once per prompt)."""
    if rank is not None:
        set_deploy_rank(model, rank)
    model.eval()
    tok = model.tokenizer
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    cand_ids = [tok(c, add_special_tokens=False)["input_ids"] for c in candidates]
    size = model.cfg.image_size
    out = np.zeros((len(questions), len(candidates)), dtype=np.float64)
    for i, (q, arrs) in enumerate(zip(questions, images)):
        p = prompt_ids(tok, q)
        rows = [p + c for c in cand_ids]
        t = max(len(r) for r in rows)
        ids = torch.full((len(rows), t), pad_id, dtype=torch.long)
        attn = torch.zeros((len(rows), t), dtype=torch.long)
        for j, r in enumerate(rows):                      # right padding: the prompt sits at the same positions
            ids[j, : len(r)], attn[j, : len(r)] = torch.tensor(r), 1
        imgs = torch.from_numpy(np.stack([np.asarray(a) for a in arrs]))[None] if arrs else \
            torch.zeros((1, 0, 3, size, size), dtype=torch.uint8)
        media = model.encode_images(imgs) if arrs else None
        logits = model(ids, attn, None, media=None if media is None else media.expand(len(rows), *media.shape[1:])).logits
        logp = torch.log_softmax(logits[:, :, : model.base_vocab].float(), dim=-1)
        for j, c in enumerate(cand_ids):
            pos = torch.arange(len(p) - 1, len(p) - 1 + len(c))
            out[i, j] = float(logp[j, pos, torch.tensor(c)].sum())
    return out
