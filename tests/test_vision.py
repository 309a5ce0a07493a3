"""The paper's ViT, its training loop (loss goes down, resume after a kill), embeddings,
augmentation, and classification metrics, on real ELPV pixels."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from maemi_core.config import ClassifierTrainingConfig
from maemi_core.data.transforms import augment, build_image_array, standardize
from maemi_core.vision.classification_metrics import classification_summary, top_k
from maemi_core.vision.classifier_training import class_weights, train_classifier
from maemi_core.vision.embeddings import embed_images
from maemi_core.vision.vit import PaperViT, PaperViTConfig


@pytest.fixture(scope="module")
def tiny_images():
    """24 real ELPV cells (two labels from the package's own annotations) at 224 px."""
    import pandas as pd

    from maemi_core.data.sources import list_elpv

    cands = list_elpv()
    good = [c for c in cands if c.label == "functional"][:12]
    bad = [c for c in cands if c.label == "defective"][:12]
    df = pd.DataFrame({"path": [str(c.path) for c in good + bad], "crop_bottom": 0})
    return build_image_array(df, 224), np.array([0] * 12 + [1] * 12)


def test_vit_shapes_and_cls_embedding():
    cfg = PaperViTConfig(num_classes=5)
    model = PaperViT(cfg).eval()
    x = torch.randn(2, 3, 224, 224)
    tokens, h_cls = model.encode(x)
    assert tokens.shape == (2, 49, 64) and h_cls.shape == (2, 64)
    assert model(x).shape == (2, 5)
    # The attention really is 4 heads of width 32 over a 64-d residual stream.
    attn = model.layers[0].attn
    assert attn.qkv.weight.shape == (3 * 4 * 32, 64) and attn.proj.weight.shape == (64, 128)
    # h_cls summarises the image: changing a patch changes it.
    x2 = x.clone()
    x2[:, :, :32, :32] = 0
    assert not torch.allclose(model.encode(x2)[1], h_cls)


def test_vit_save_load_round_trip(tmp_path):
    model = PaperViT(PaperViTConfig(num_classes=3)).eval()
    model.save(tmp_path / "vit", ["a", "b", "c"])
    loaded, names = PaperViT.load(tmp_path / "vit")
    x = torch.randn(2, 3, 224, 224)
    assert names == ["a", "b", "c"]
    torch.testing.assert_close(loaded(x), model(x))


def test_augmentation_keeps_shape_range_and_is_seeded():
    x = standardize(torch.randint(0, 256, (4, 3, 224, 224), dtype=torch.uint8))
    a1 = augment(x, torch.Generator().manual_seed(0))
    a2 = augment(x, torch.Generator().manual_seed(0))
    assert a1.shape == x.shape and a1.min() >= -1 and a1.max() <= 1
    torch.testing.assert_close(a1, a2)
    assert not torch.allclose(a1, x)


def test_class_weights_balance_the_loss():
    w = class_weights(np.array([0, 0, 0, 1]), 3)
    assert w.tolist() == pytest.approx([4 / 9, 4 / 3, 0.0])


def _small_cfg(**kw) -> ClassifierTrainingConfig:
    base = dict(batch_size=8, lr=1e-3, max_epochs=6, early_stopping_patience=50, lr_patience=50,
                augment=False, seed=0)
    return ClassifierTrainingConfig(**(base | kw))


def test_training_lowers_the_loss_on_real_images(tmp_path, tiny_images):
    images, labels = tiny_images
    torch.manual_seed(0)   # the initialisation; 10 epochs lower the loss to 0.55-0.77x over init seeds 0-7
    model = PaperViT(PaperViTConfig(num_classes=2, dropout=0.0))
    result = train_classifier(model, images, labels, images[:8], labels[:8], _small_cfg(max_epochs=10),
                              tmp_path / "ckpt.pt", fingerprint="f")
    losses = [r.train_loss for r in result.history]
    assert len(losses) == 10
    assert losses[-1] < 0.8 * losses[0], losses
    assert result.best_epoch >= 1


def test_training_resumes_after_interruption(tmp_path, tiny_images):
    images, labels = tiny_images
    cfg = _small_cfg(max_epochs=4, augment=True)

    torch.manual_seed(123)
    straight = PaperViT(PaperViTConfig(num_classes=2))
    full = train_classifier(straight, images, labels, images[:8], labels[:8], cfg, tmp_path / "a.pt", "f")

    torch.manual_seed(123)
    killed = PaperViT(PaperViTConfig(num_classes=2))
    part = train_classifier(killed, images, labels, images[:8], labels[:8], cfg, tmp_path / "b.pt", "f",
                            stop_after_epoch=2)
    assert len(part.history) == 2
    torch.manual_seed(999)  # a new process: different init, which the checkpoint overrides
    resumed_model = PaperViT(PaperViTConfig(num_classes=2))
    resumed = train_classifier(resumed_model, images, labels, images[:8], labels[:8], cfg, tmp_path / "b.pt", "f")
    assert resumed.resumed_from_epoch == 2
    assert [round(r.train_loss, 5) for r in resumed.history] == [round(r.train_loss, 5) for r in full.history]
    for p, q in zip(straight.state_dict().values(), resumed_model.state_dict().values()):
        torch.testing.assert_close(p, q)

    # A checkpoint written for other data or settings is not resumed.
    other = train_classifier(PaperViT(PaperViTConfig(num_classes=2)), images, labels, images[:8], labels[:8],
                             _small_cfg(max_epochs=1), tmp_path / "b.pt", "other-fingerprint")
    assert other.resumed_from_epoch == 0


def test_embeddings_are_unit_norm(tiny_images):
    images, _ = tiny_images
    emb = embed_images(PaperViT(PaperViTConfig(num_classes=2)), images[:10], batch_size=4)
    assert emb.shape == (10, 64)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)


def test_efficientnet_encoder_loads_from_the_package(tiny_images):
    from maemi_core.vision.efficientnet_lite0 import EfficientNetLite0Encoder

    enc = EfficientNetLite0Encoder()
    tokens, h = enc.encode(standardize(torch.from_numpy(tiny_images[0][:2])))
    assert tokens.shape == (2, 49, 1280) and h.shape == (2, 1280)
    assert not any(p.requires_grad for p in enc.parameters())
    # Real ImageNet weights: the 1000-way head is confident on something, not uniform.
    logits = enc.net(standardize(torch.from_numpy(tiny_images[0][:1])))
    assert torch.softmax(logits, 1).max() > 0.01


def test_efficientnet_inference_copy_matches_the_network(tiny_images):
    """Without autograd the encoder runs a copy with batch norms folded, channels-last, in chunks of
    16: the same tokens as the plain network (float rounding only), on a batch crossing a chunk."""
    from maemi_core.vision.efficientnet_lite0 import INFERENCE_CHUNK, EfficientNetLite0Encoder

    enc = EfficientNetLite0Encoder()
    x = standardize(torch.from_numpy(np.concatenate([tiny_images[0]] * 2)[: INFERENCE_CHUNK + 3]))
    assert len(x) == INFERENCE_CHUNK + 3
    with torch.no_grad():
        fast_tokens, fast_h = enc.encode(x)
        plain = enc.net.extract_features(x).flatten(2).transpose(1, 2)
    scale = plain.abs().max().item()
    assert fast_tokens.shape == plain.shape
    assert (fast_tokens - plain).abs().max().item() <= 1e-4 * scale
    assert torch.allclose(fast_h, plain.mean(1), atol=1e-4 * scale)
    # The copy is not part of the module: nothing about it is saved or packaged.
    assert all(k.startswith("net.") for k in enc.state_dict())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in enc.net.modules())
    # It follows the network to another dtype (or device) instead of serving a stale copy.
    enc.to(torch.float64)
    with torch.no_grad():
        tokens64, _ = enc.encode(x[:2].double())
    assert tokens64.dtype == torch.float64
    assert (tokens64.float() - plain[:2]).abs().max().item() <= 1e-4 * scale


def test_topk_is_capped_at_the_class_count():
    y = np.array([0, 1, 2])
    scores = np.array([[0.9, 0.05, 0.05], [0.1, 0.2, 0.7], [0.5, 0.4, 0.1]])
    assert top_k(y, scores, 1) == pytest.approx(1 / 3)
    assert top_k(y, scores, 2) == pytest.approx(2 / 3)
    assert top_k(y, scores, 5) == 1.0
    s = classification_summary("m", y, scores, ["a", "b", "c"])
    assert s["top5_k"] == 3 and s["top1"] == pytest.approx(1 / 3)


@pytest.mark.parametrize("value", [0, 255, 117])
def test_uniform_images_give_finite_texture_features(value):
    from maemi_core.vision.texture_baseline import texture_features

    f = texture_features(np.full((224, 224), value, dtype=np.uint8))
    assert np.isfinite(f).all() and f.shape == texture_features(np.random.default_rng(0).integers(
        0, 255, (224, 224), dtype=np.uint8)).shape


def test_grouped_cv_scores_unseen_samples_not_copies_and_is_deterministic():
    """Copies of 40 samples with labels unrelated to any real signal: random folds (each image its
    own group) score the copies of training samples and claim near-perfect accuracy; folds that
    keep a sample together estimate chance, which is the truth for new samples."""
    from sklearn.linear_model import LogisticRegression

    from maemi_core.vision.model_selection import choose_c

    rng = np.random.default_rng(0)
    centers, labels = rng.normal(size=(40, 128)), rng.integers(0, 2, 40)
    sample = np.repeat(np.arange(40), 6)                       # 6 shifted copies per sample
    x = centers[sample] + rng.normal(scale=0.01, size=(240, 128))
    y = labels[sample]
    tr, va = sample < 32, sample >= 32

    def make(c):
        return LogisticRegression(C=c, max_iter=2000)

    args = (make, (0.01, 1.0, 100.0), x[tr], y[tr])
    grouped = choose_c(*args, sample[tr].astype(str), x[va], y[va], sample[va].astype(str))
    leaky = choose_c(*args, np.arange(tr.sum()).astype(str), x[va], y[va], np.arange(va.sum()).astype(str))
    assert grouped.method.startswith("grouped") and leaky.method.startswith("grouped")
    assert leaky.val_top1 > 0.95 and grouped.val_top1 < 0.75
    assert choose_c(*args, sample[tr].astype(str), x[va], y[va], sample[va].astype(str)) == grouped
    big_val = choose_c(*args, sample[tr].astype(str), x[va], y[va], sample[va].astype(str), cv_below=10)
    assert big_val.method == "validation split"


def test_texture_blocks_cover_every_column_once_in_order():
    from maemi_core.vision.texture_baseline import FEATURE_BLOCKS, block_slices, feature_set_columns, texture_features

    img = np.random.default_rng(1).integers(0, 255, (150, 230), dtype=np.uint8)
    n = len(texture_features(img))
    sl = block_slices()
    assert [sl[b].start for b in FEATURE_BLOCKS][0] == 0 and sl[FEATURE_BLOCKS[-1]].stop == n
    assert all(sl[a].stop == sl[b].start for a, b in zip(FEATURE_BLOCKS, FEATURE_BLOCKS[1:]))
    assert sl["lbp"].stop - sl["lbp"].start == 10 + 18 + 26 and sl["intensity"].stop - sl["intensity"].start == 9
    cols = feature_set_columns(("glcm", "lbp"))          # order of the blocks, not of the request
    assert list(cols) == list(range(sl["lbp"].start, sl["glcm"].stop))
    with pytest.raises(ValueError, match="non-empty subset"):
        feature_set_columns(("lbp", "sift"))


def test_feature_set_choice_drops_a_block_of_noise_and_keeps_the_first_on_ties():
    """An RBF SVM on 8 informative columns plus 600 columns of noise: the kernel's distances are
    mostly noise, so validation must prefer the informative block alone."""
    from maemi_core.vision.model_selection import choose_columns_and_c
    from maemi_core.vision.texture_baseline import svm_model

    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 600)
    signal = rng.normal(size=(3, 8))[y] + rng.normal(scale=1.0, size=(600, 8))
    x = np.concatenate([signal, rng.normal(size=(600, 600))], axis=1)
    g = np.arange(600).astype(str)
    tr, va = slice(0, 450), slice(450, 600)
    sets = {"all": np.arange(608), "signal": np.arange(8), "noise": np.arange(8, 608)}
    got = choose_columns_and_c(svm_model, (1.0, 10.0), sets, x[tr], y[tr], g[tr], x[va], y[va], g[va], cv_below=10)
    assert got.name == "signal" and got.selection.method == "validation split"
    assert got.scores["signal"] > got.scores["all"] + 0.1 and got.scores["noise"] < 0.5
    same = choose_columns_and_c(svm_model, (1.0,), {"first": np.arange(8), "second": np.arange(8)},
                                x[tr], y[tr], g[tr], x[va], y[va], g[va], cv_below=10)
    assert same.name == "first"
