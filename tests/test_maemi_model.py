"""The MAEMI model on a tiny random Llama with SmolLM2's tokenizer and the paper ViT."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from maemi_core.model.dyqlora_fa import DyLoRAFALinear
from maemi_core.model.generation import generate_answers
from maemi_core.model.language_model import load_language_model
from maemi_core.model.maemi_model import MaemiModel, MaemiModelConfig
from maemi_core.training.maemi_training import ImageStore, MaemiTrainingConfig, build_examples, train_maemi
from maemi_core.vision.vit import PaperViT, PaperViTConfig


def tiny_model(quantize: bool = True, seed: int = 0, media_standardize: bool = False) -> MaemiModel:
    lm, tok = load_language_model("tiny", seed=seed)
    torch.manual_seed(seed)
    vit = PaperViT(PaperViTConfig(num_classes=2)).eval()
    return MaemiModel(lm, tok, vit, 64, MaemiModelConfig(xattn_every=1, xattn_heads=2, xattn_head_dim=16,
                                                         r_min=2, r_max=8, alpha=8, quantize=quantize,
                                                         media_standardize=media_standardize))


def test_closed_gates_give_exactly_the_base_lm():
    lm, tok = load_language_model("tiny", seed=0)
    ids = tok("a scanning electron micrograph of particles", return_tensors="pt")
    with torch.no_grad():
        ref = lm(**ids).logits
    model = tiny_model(quantize=False)
    img = torch.randint(0, 255, (1, 1, 3, 224, 224), dtype=torch.uint8)
    with torch.no_grad():
        out = model(ids["input_ids"], ids["attention_mask"], img).logits   # no <image> marker: nothing attends
        prompt = tok("<image>\nwhat is it?", return_tensors="pt")
        with_image = model(prompt["input_ids"], prompt["attention_mask"], img).logits
        without = model(prompt["input_ids"], prompt["attention_mask"], None).logits
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(with_image, without)                          # gates at 0: the image has no effect


def test_only_adapters_xattn_and_new_tokens_train():
    model = tiny_model()
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all(("lora_B" in n) or (".xattn." in n) or n == "new_token_embeddings" for n in names)
    assert any("lora_B" in n for n in names) and any(".xattn." in n for n in names)
    layers = [m for m in model.modules() if isinstance(m, DyLoRAFALinear)]
    assert len(layers) == 2 * 7 and all(m.weight_q.dtype == torch.int8 for m in layers)
    counts = model.parameter_counts()
    assert counts["trainable"] == counts["lora_B"] + counts["gated_xattn"] + counts["new_token_embeddings"]


def _toy_data(model, n=12):
    rng = np.random.default_rng(0)
    images = {f"i{k}": (rng.integers(0, 255, (3, 224, 224), dtype=np.uint8)) for k in range(4)}
    store = ImageStore({}, 224)
    store._cache.update(images)
    answers = ["bright round particles", "dark cracked cell", "uniform film", "porous sponge"]
    records = [{"id": f"r{k}", "image_ids": [f"i{k % 4}"],
                "conversations": [{"from": "human", "value": "<image>\nDescribe the image."},
                                  {"from": "gpt", "value": answers[k % 4]}]} for k in range(n)]
    examples, dropped = build_examples(records, model.tokenizer, 128)
    assert dropped == 0
    return examples, store


def test_prompt_tokens_are_masked():
    model = tiny_model()
    (ex, *_), _ = _toy_data(model, 1)
    answer = [t for t, l in zip(ex.input_ids, ex.labels) if l != -100]
    assert model.tokenizer.decode(answer).startswith("bright round particles")
    assert ex.input_ids.count(model.image_token_id) == 1 and model.encode_token_id in ex.input_ids


def test_an_oversampled_stream_repeats_each_example_as_its_record_and_counts_a_dropped_record_once():
    from maemi_core.training.instruction_tuning import build_stream_examples, select_records

    model = tiny_model()
    long = "<image>\n" + "describe every grain boundary " * 40
    records = [{"id": f"{t}-{k}", "task": t, "split": "train", "image_ids": ["i0"],
                "conversations": [{"from": "human", "value": long if k == 0 and t == "vqa" else f"<image>\nquestion {k}"},
                                  {"from": "gpt", "value": f"answer {t} {k}"}]}
               for t in ("caption", "vqa") for k in range(3)]
    stream = select_records(records, "train", ["caption", "vqa"], None, {"vqa": 3})
    examples, dropped = build_stream_examples(stream, model.tokenizer, 64)
    plain, plain_dropped = build_examples(stream, model.tokenizer, 64)
    assert [(e.id, e.input_ids, e.labels) for e in examples] == [(e.id, e.input_ids, e.labels) for e in plain]
    assert len(examples) == 3 + 2 * 3 and dropped == 1 and plain_dropped == 3


def test_train_task_views_show_a_records_copies_mirrored_and_leave_other_tasks_alone():
    from maemi_core.training.instruction_tuning import select_records, with_views
    from maemi_core.training.maemi_training import MediaCache

    model = tiny_model()
    (ex, *_), store = _toy_data(model, 1)
    records = [{"id": f"{t}-{k}", "task": t, "split": "train", "image_ids": [f"i{k}"],
                "conversations": [{"from": "human", "value": "<image>\nquestion"}, {"from": "gpt", "value": "a"}]}
               for t in ("caption", "classify_zero_shot") for k in range(2)]
    stream = with_views(select_records(records, "train", ["caption", "classify_zero_shot"], None,
                                       {"classify_zero_shot": 4}), {"classify_zero_shot": ["none", "hflip", "vflip"]})
    shown = {}
    for r in stream:
        shown.setdefault(r["id"], []).append(r["image_ids"][0])
    assert shown["caption-0"] == ["i0"] and shown["caption-1"] == ["i1"]
    assert shown["classify_zero_shot-1"] == ["i1", "i1|hflip", "i1|vflip", "i1"]      # cyclic over the copies
    assert all(r["image_ids"] == [f"i{r['id'][-1]}"] for r in records)                # the records are not changed
    base = store.get("i1")
    np.testing.assert_array_equal(store.get("i1|hflip"), base[:, :, ::-1])
    np.testing.assert_array_equal(store.get("i1|vflip"), base[:, ::-1, :])
    np.testing.assert_array_equal(store.get("i1|rot180"), base[:, ::-1, ::-1])
    media = MediaCache(model, store)
    tokens = media.tokens(["i1", "i1|hflip"])
    assert media.encoded == 2 and not torch.allclose(tokens[0], tokens[1])           # a view is encoded as itself
    assert with_views(stream, {}) is stream


def test_train_task_views_need_the_stream_and_a_trained_task():
    from maemi_core.config import ModelConfig

    ModelConfig(train_task_views={"classify_zero_shot": ["none", "hflip"]})
    with pytest.raises(ValueError, match="train_task_views"):
        ModelConfig(train_tasks=["caption"], train_task_views={"classify_zero_shot": ["hflip"]})
    with pytest.raises(ValueError, match="max_train_records"):
        ModelConfig(max_train_records=64, train_task_views={"classify_zero_shot": ["hflip"]})
    with pytest.raises(ValueError):
        ModelConfig(train_task_views={"classify_zero_shot": ["rot90"]})


def test_a_run_killed_mid_budget_resumes_and_ends_with_the_weights_of_an_uninterrupted_one(tmp_path):
    # 12 examples, 3 micro-batches of 4, 2 per optimizer step: 2 steps per epoch. A budget of 900
    # tokens crosses epochs and ends mid-epoch; the kill falls mid-epoch, between evaluation points.
    cfg = MaemiTrainingConfig(lr=1e-2, micro_batch=4, effective_batch=8, budget_tokens=900, decay_fraction=0.5,
                              eval_points=2, checkpoint_minutes=60, seed=0)

    straight = tiny_model()
    examples, store = _toy_data(straight)
    full = train_maemi(straight, examples, examples[:4], store, cfg, tmp_path / "a.pt", "f")
    assert full.tokens >= 900 and full.steps >= 4 and full.history[-1].epoch >= 2
    assert full.history[-1].val_loss < full.history[0].val_loss
    assert full.history[-1].lr < 0.5e-2                       # the cooldown ran: the last step's rate is decayed

    killed = tiny_model()
    part = train_maemi(killed, examples, examples[:4], store, cfg, tmp_path / "b.pt", "f", stop_after_steps=3)
    assert part.steps == 3 and part.tokens < 900
    resumed_model = tiny_model()
    resumed = train_maemi(resumed_model, examples, examples[:4], store, cfg, tmp_path / "b.pt", "f")
    assert resumed.resumed_from_step == 3 and resumed.steps == full.steps and resumed.tokens == full.tokens
    assert [round(h.train_loss, 5) for h in resumed.history] == [round(h.train_loss, 5) for h in full.history]
    a, b = straight.trainable_state_dict(), resumed_model.trainable_state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), k                     # same threads, same arithmetic: the same bits
    # A finished run is not trained again: the same checkpoint gives the same weights at once.
    again = tiny_model()
    done = train_maemi(again, examples, examples[:4], store, cfg, tmp_path / "b.pt", "f")
    assert done.resumed_from_step == full.steps and all(torch.equal(a[k], again.trainable_state_dict()[k]) for k in a)
    # Another fingerprint (other data or settings) never resumes that checkpoint.
    other = train_maemi(tiny_model(), examples, examples[:4], store, cfg, tmp_path / "b.pt", "g", stop_after_steps=1)
    assert other.resumed_from_step == 0 and other.steps == 1


@pytest.mark.parametrize("budget", [{"budget_tokens": 1000}, {"budget_epochs": 1.5}, {"budget_minutes": 0.02}])
def test_each_budget_unit_stops_where_it_says(tmp_path, budget):
    model = tiny_model()
    examples, store = _toy_data(model)
    cfg = MaemiTrainingConfig(lr=1e-2, micro_batch=4, effective_batch=8, seed=0, eval_points=1, **budget)
    res = train_maemi(model, examples, [], store, cfg, tmp_path / "c.pt", "f")
    if "budget_tokens" in budget:
        assert res.tokens >= 1000 and res.tokens - max(len(e.input_ids) for e in examples) * 8 < 1000
    elif "budget_epochs" in budget:
        assert res.steps == 3                                  # 2 steps per epoch: 1.5 epochs
    else:
        assert res.minutes >= 0.02 and res.steps >= 1


def test_warmup_stable_decay_schedule():
    from maemi_core.training.maemi_training import lr_factor

    assert [lr_factor(p, 0.25) for p in (0.0, 0.5, 0.75)] == [1.0, 1.0, 1.0]
    assert lr_factor(0.875, 0.25) == pytest.approx(0.5) and lr_factor(1.0, 0.25) == 0.0
    assert lr_factor(0.9, 0.0) == 1.0                                    # no decay: constant
    assert lr_factor(0.1, 0.25, step=0, warmup_steps=4) == pytest.approx(0.25)
    with pytest.raises(ValueError, match="exactly one positive budget"):
        MaemiTrainingConfig(budget_tokens=10, budget_minutes=1)


def test_visual_token_standardisation_is_fitted_once_on_train_images_and_travels_with_the_weights(tmp_path):
    cfg = MaemiTrainingConfig(lr=1e-2, micro_batch=4, effective_batch=8, budget_epochs=2, seed=0)
    model = tiny_model(media_standardize=True)
    examples, store = _toy_data(model)
    assert not model.media_statistics_fitted
    train_maemi(model, examples, examples[:4], store, cfg, tmp_path / "a.pt", "f")
    assert int(model.media_images) == 4                                      # the 4 distinct train images
    raw = torch.cat([model.encode_images(torch.from_numpy(store.get(f"i{k}"))[None, None]) for k in range(4)])[:, 0]
    flat = raw.reshape(-1, raw.shape[-1])
    torch.testing.assert_close(model.media_mean, flat.mean(0))
    seen = {}
    layer = next(la for la in model.lm.model.layers if la.xattn is not None)
    layer.xattn.register_forward_pre_hook(lambda mod, args: seen.update(media=args[1]))
    ids = model.tokenizer("<image>\nwhat is it?", return_tensors="pt")
    with torch.no_grad():
        model(ids["input_ids"], ids["attention_mask"], None, media=raw[:1, None])
    expect = (raw[:1] - model.media_mean) / model.media_std
    torch.testing.assert_close(seen["media"][:, 0], expect)                  # what the cross-attention reads
    kept = model.trainable_state_dict()
    assert {"media_mean", "media_std", "media_images"} <= set(kept)
    # A fresh model given the kept tensors standardises identically and is not refitted by training.
    fresh = tiny_model(media_standardize=True)
    fresh.load_state_dict(kept, strict=False)
    assert fresh.media_statistics_fitted
    before = fresh.media_mean.clone()
    train_maemi(fresh, examples[:4], [], store, MaemiTrainingConfig(lr=1e-2, micro_batch=4, effective_batch=4,
                                                                   budget_epochs=1, seed=0), tmp_path / "b.pt", "g")
    torch.testing.assert_close(fresh.media_mean, before)
    with pytest.raises(ValueError, match="at least one image"):
        fresh.fit_media_statistics(torch.zeros(0, 5, 64))


@pytest.mark.parametrize("rank", [2, 5, 8])
def test_generation_runs_at_any_trained_rank(rank):
    model = tiny_model()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, DyLoRAFALinear):
                m.lora_B.normal_(0, 0.1)
    img = np.zeros((3, 224, 224), np.uint8)
    out = generate_answers(model, ["<image>\nWhat is it?", "<image><image>\nCompare."], [[img], [img, img]],
                           max_new_tokens=5, rank=rank)
    assert len(out) == 2 and all(isinstance(o, str) for o in out)


def _opened(model):
    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(("attn_gate", "ff_gate")):
                p.fill_(0.8)
            elif "lora_B" in n:
                p.normal_(0, 0.1)
    return model.eval()


def test_cached_candidate_likelihoods_equal_one_full_forward_per_candidate():
    from maemi_core.model.dyqlora_fa import training_numerics
    from maemi_core.model.generation import candidate_log_likelihoods
    from maemi_core.model.prompts import prompt_ids

    model = _opened(tiny_model())
    rng = np.random.default_rng(0)
    imgs = [[rng.integers(0, 255, (3, 224, 224), dtype=np.uint8)] for _ in range(2)] + \
           [[rng.integers(0, 255, (3, 224, 224), dtype=np.uint8) for _ in range(2)]]
    questions = ["<image>\nWhich class?", "<image>\nClassify this cell image, please.", "<image> <image>\nThe last?"]
    cands = ["functional", "possibly_defective", "defective"]
    with training_numerics(model):
        got = candidate_log_likelihoods(model, questions, imgs, cands, batch_size=2)
        same, hidden = candidate_log_likelihoods(model, questions, imgs, cands, batch_size=2, return_hidden=True)
        np.testing.assert_array_equal(same, got)
        assert hidden.shape == (3, model.lm.config.hidden_size)
        tok = model.tokenizer
        for i, (q, arrs) in enumerate(zip(questions, imgs)):
            p = prompt_ids(tok, q)
            media = model.encode_images(torch.from_numpy(np.stack(arrs))[None])
            for j, c in enumerate(cands):
                cid = tok(c, add_special_tokens=False)["input_ids"]
                ids = torch.tensor([p + cid])
                with torch.no_grad():
                    logits = model(ids, torch.ones_like(ids), None, media=media).logits[0, :, : model.base_vocab]
                logp = torch.log_softmax(logits.float(), -1)
                ref = sum(float(logp[len(p) - 1 + k, t]) for k, t in enumerate(cid))
                assert abs(got[i, j] - ref) < 1e-3, (i, j, got[i, j], ref)
            # the returned state is the one the LM head reads the first answer token from
            with torch.no_grad():
                head = model.lm.lm_head(torch.from_numpy(hidden[i:i + 1])).float()[0, : model.base_vocab]
            np.testing.assert_allclose(head.numpy(), logits[len(p) - 1].float().numpy(), atol=2e-3)
    # Plain prompts (base_lm): no image, so the batch shares everything up to where the questions
    # differ; the scores are still those of one full forward per candidate.
    same_start = ["<image>\nWhich class is this?", "<image>\nWhich class is it, please?"]
    with model.base_lm_only():
        got = candidate_log_likelihoods(model, same_start, imgs[:2], cands, plain=True, batch_size=2)
        for i, q in enumerate(same_start):
            p = prompt_ids(tok, q, plain=True)
            for j, c in enumerate(cands):
                cid = tok(c, add_special_tokens=False)["input_ids"]
                ids = torch.tensor([p + cid])
                with torch.no_grad():
                    logp = torch.log_softmax(model.lm(input_ids=ids).logits[0, :, : model.base_vocab].float(), -1)
                ref = sum(float(logp[len(p) - 1 + k, t]) for k, t in enumerate(cid))
                assert abs(got[i, j] - ref) < 1e-3, (i, j, got[i, j], ref)


def test_plain_prompt_is_the_shipped_lm_and_a_call_rank_does_not_persist():
    from maemi_core.model.dyqlora_fa import dylora_layers
    from maemi_core.model.prompts import prompt_ids

    model = _opened(tiny_model(quantize=False))
    tok = model.tokenizer
    plain = prompt_ids(tok, "<image>\nWhat is  it?", plain=True)
    assert model.image_token_id not in plain and model.encode_token_id not in plain
    assert plain == list(tok.apply_chat_template([{"role": "user", "content": "What is it?"}],
                                                 add_generation_prompt=True, tokenize=True, return_dict=False))
    lm, _ = load_language_model("tiny", seed=0)
    img = np.zeros((3, 224, 224), np.uint8)
    with model.base_lm_only():
        got = generate_answers(model, ["<image>\nWhat is it?"], [[img]], max_new_tokens=6, plain=True)
    ids = torch.tensor([plain])
    ref = lm.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                      pad_token_id=tok.eos_token_id)
    assert got[0] == tok.decode(ref[0, len(plain):], skip_special_tokens=True).strip()
    generate_answers(model, ["<image>\nWhat is it?"], [[img]], max_new_tokens=2, rank=3)
    assert all(m.rank == 8 for m in dylora_layers(model))


def test_concurrent_requests_with_different_images_and_ranks_answer_as_if_alone():
    """Rank and image conditioning travel with the call (thread-local), not on shared modules:
    eight requests answered at once in one process give each the answer it gets alone."""
    import threading

    from maemi_core.model.dyqlora_fa import dylora_layers

    model = _opened(tiny_model())
    rng = np.random.default_rng(3)
    requests = [(rng.integers(0, 255, (3, 224, 224), dtype=np.uint8), rank) for rank in (2, 8, 4, 6, 3, 8, 5, 2)]
    alone = [generate_answers(model, ["<image>\nWhat is it?"], [[img]], max_new_tokens=8, rank=r)[0]
             for img, r in requests]
    assert len(set(alone)) > 1                                # the requests really differ
    got: dict[int, str] = {}
    barrier = threading.Barrier(len(requests))

    def ask(i: int) -> None:
        img, r = requests[i]
        barrier.wait()
        got[i] = generate_answers(model, ["<image>\nWhat is it?"], [[img]], max_new_tokens=8, rank=r)[0]

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [got[i] for i in range(len(requests))] == alone
    assert all(m.rank == 8 for m in dylora_layers(model))    # no request changed the model


def test_training_fingerprint_changes_with_the_frozen_encoder_weights():
    from maemi_core.training.instruction_tuning import encoder_fingerprint

    a, b, c = tiny_model(seed=0), tiny_model(seed=0), tiny_model(seed=1)
    assert encoder_fingerprint(a) == encoder_fingerprint(b)
    assert encoder_fingerprint(a) != encoder_fingerprint(c)       # a re-trained ViT under the same name


def test_answerer_encodes_each_image_once_and_scores_as_without_the_memo():
    import pandas as pd

    from maemi_core.evaluation.answering import BASE_LM, GATES_CLOSED, Answerer
    from maemi_core.model.generation import candidate_log_likelihoods

    model = _opened(tiny_model())
    rng = np.random.default_rng(3)
    arrays = {f"i{k}": rng.integers(0, 255, (3, 224, 224), dtype=np.uint8) for k in range(3)}
    answerer = Answerer(model, pd.DataFrame({"image_id": [], "path": [], "crop_bottom": []}), batch_size=4)
    answerer.images._cache.update(arrays)
    recs = [{"id": "a", "image_ids": ["i0"], "conversations": [{"value": "<image>\nWhich class?"}]},
            {"id": "b", "image_ids": ["i1"], "conversations": [{"value": "<image>\nClassify this cell image."}]},
            {"id": "c", "image_ids": ["i0", "i1", "i2"],     # a few-shot prompt reuses images
             "conversations": [{"value": "<image> <image> <image>\nThe last one?"}]}]
    cands = ["functional", "possibly_defective", "defective"]
    scores = answerer.category_scores(recs, cands)
    answers = answerer.answer(recs, max_new_tokens=5)
    for method in (GATES_CLOSED, BASE_LM):
        answerer.category_scores(recs, cands, method)
    assert answerer.media.encoded == 3          # three distinct images, however often they are asked about

    qs = [r["conversations"][0]["value"] for r in recs]
    imgs = [[arrays[i] for i in r["image_ids"]] for r in recs]
    np.testing.assert_allclose(scores, candidate_log_likelihoods(model, qs, imgs, cands, batch_size=4), atol=1e-4)
    order = [0, 1, 2]      # the Answerer's order here: by image count, then question length
    ref = generate_answers(model, [qs[i] for i in order], [imgs[i] for i in order], max_new_tokens=5)
    assert answers == [ref[order.index(i)] for i in range(3)]


def test_visual_token_memo_keeps_the_most_recent_images_within_capacity():
    from maemi_core.training.maemi_training import MediaCache

    model = tiny_model()
    rng = np.random.default_rng(4)
    store = ImageStore({}, 224)
    store._cache.update({f"i{k}": rng.integers(0, 255, (3, 224, 224), dtype=np.uint8) for k in range(3)})
    memo = MediaCache(model, store, capacity=2)
    first = memo.tokens(["i0", "i1"])
    memo.tokens(["i0"])                           # i0 is now the most recent: i1 leaves next
    memo.tokens(["i2"])
    assert memo.encoded == 3 and list(memo._tokens) == ["i0", "i2"]
    again = memo.tokens(["i1"])                   # evicted, so encoded again: the same tokens
    assert memo.encoded == 4
    torch.testing.assert_close(again[0], first[1])
    with pytest.raises(ValueError, match="capacity"):
        memo.tokens(["i0", "i1", "i2"])


def test_shared_prefix_stops_before_the_first_image_and_leaves_a_token_per_row():
    from maemi_core.model.generation import shared_prefix_length

    img = 9
    assert shared_prefix_length([[1, 2, 3, img, 4], [1, 2, 3, img, 5]], img) == 3
    assert shared_prefix_length([[1, 2, img, 3], [1, 2, 3, img]], img) == 2
    assert shared_prefix_length([[1, 2], [1, 2]], img) == 1
    assert shared_prefix_length([[1, 2, 3], [1, 5]], img) == 1
    assert shared_prefix_length([[img, 1], [img, 1]], img) == 0
    assert shared_prefix_length([], img) == 0


def test_tensor_hashes_take_bfloat16_and_tell_it_from_its_bytes_as_integers():
    from maemi_core.training.instruction_tuning import tensors_sha256

    x = torch.linspace(-2, 2, 16)
    bf = {"w": x.to(torch.bfloat16)}
    assert tensors_sha256(bf) == tensors_sha256({"w": x.to(torch.bfloat16).clone()})
    assert tensors_sha256(bf) != tensors_sha256({"w": x.to(torch.bfloat16).view(torch.int16)})
    assert tensors_sha256(bf) != tensors_sha256({"w": (x + 1).to(torch.bfloat16)})
    assert tensors_sha256({"w": x}) == tensors_sha256({"w": x.clone()})     # float32: its bytes, as before
    import hashlib
    assert tensors_sha256({"w": x}) == hashlib.sha256(b"w" + x.numpy().tobytes()).hexdigest()[:16]


def test_served_category_probabilities_read_the_packages_head_from_the_images_answer_states():
    """`maemi classify`, the chat page and the served model turn each image's answer-position
    state into probabilities with the package's head, the way the benchmark scored it."""
    from maemi_core.model.category_scoring import apply_head, fit_head
    from maemi_core.model.generation import candidate_log_likelihoods
    from maemi_core.registry.serving import category_probabilities

    model = _opened(tiny_model())
    rng = np.random.default_rng(1)
    arrays = [rng.integers(0, 255, (3, 224, 224), dtype=np.uint8) for _ in range(4)]
    classes, question = ["defective", "functional", "possibly_defective"], "<image>\nWhich category?"
    width = model.lm.config.hidden_size
    head = fit_head(rng.normal(size=(30, width)), np.arange(30) % 3, 3)
    model.package_meta = {"class_names": classes, "classify_question": question,
                          "category_scoring": {"chosen": "head", "head": head}}
    got_classes, scoring, probs = category_probabilities(model, "models:/tiny/1", arrays)
    _, hidden = candidate_log_likelihoods(model, [question] * 4, [[a] for a in arrays], classes, return_hidden=True)
    assert got_classes == classes and scoring == "head"
    np.testing.assert_allclose(probs, np.exp(apply_head(hidden, head)), atol=1e-6)
    assert not np.allclose(probs[0], probs[1])          # each image's own state, not one row for all
