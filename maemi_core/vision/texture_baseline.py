"""The classical baseline: hand-crafted texture features (scikit-image) + an SVM (scikit-learn).

Features of the 224x224 greyscale image:
- LBP: rotation-invariant uniform local binary patterns at (P, R) = (8, 1), (16, 2), (24, 3),
  as normalised histograms: micro-texture independent of orientation;
- GLCM: contrast, dissimilarity, homogeneity, energy, correlation and ASM at distances
  1, 2, 4, averaged and ranged over the four directions (so orientation-free);
- HOG on a 112x112 copy: edge layout (busbars, cracks, particle outlines);
- intensity statistics: mean, std, skewness, kurtosis, 5/25/50/75/95 percentiles.

Which of these blocks the SVM uses is chosen on validation (``vision.classical_feature_sets``):
on one image set HOG's layout carries the class, on another it is 1,300 columns of noise that
the RBF kernel's distances drown in (steel-defect textures are classified better by LBP + GLCM
alone).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from joblib import Parallel, delayed
from joblib.externals.loky import get_reusable_executor
from scipy.stats import kurtosis, skew
from skimage.feature import graycomatrix, graycoprops, hog, local_binary_pattern
from skimage.transform import resize
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC

_LBP = ((8, 1), (16, 2), (24, 3))
_GLCM_PROPS = ("contrast", "dissimilarity", "homogeneity", "energy", "correlation", "ASM")
FEATURE_BLOCKS = ("lbp", "glcm", "hog", "intensity")   # column order of texture_features
# Candidates the validation split chooses from (first wins ties): the texture core (LBP + GLCM)
# with and without the layout (HOG) and intensity blocks, and each texture block alone.
DEFAULT_FEATURE_SETS = (("lbp", "glcm", "hog", "intensity"), ("lbp", "glcm", "intensity"), ("lbp", "glcm", "hog"),
                        ("lbp", "glcm"), ("lbp",), ("glcm",))


def _feature_blocks(gray_u8: np.ndarray) -> dict[str, np.ndarray]:
    lbp = []
    for p, r in _LBP:
        codes = local_binary_pattern(gray_u8, p, r, method="uniform")
        hist, _ = np.histogram(codes, bins=p + 2, range=(0, p + 2))
        lbp.append(hist / max(hist.sum(), 1))
    q = (gray_u8 // 4).astype(np.uint8)  # 64 grey levels
    glcm = graycomatrix(q, distances=[1, 2, 4], angles=[0, np.pi / 4, np.pi / 2, 3 * np.pi / 4],
                        levels=64, symmetric=True, normed=True)
    co = []
    for prop in _GLCM_PROPS:
        v = graycoprops(glcm, prop)  # (distances, angles)
        co.append(v.mean(axis=1))
        co.append(v.max(axis=1) - v.min(axis=1))
    small = resize(gray_u8, (112, 112), anti_aliasing=True, preserve_range=True)
    g = gray_u8.astype(np.float64).ravel() / 255.0
    return {"lbp": np.concatenate(lbp), "glcm": np.concatenate(co),
            "hog": hog(small, orientations=9, pixels_per_cell=(16, 16), cells_per_block=(2, 2), feature_vector=True),
            "intensity": np.array([g.mean(), g.std(), skew(g), kurtosis(g), *np.percentile(g, [5, 25, 50, 75, 95])])}


def texture_features(gray_u8: np.ndarray) -> np.ndarray:
    """Feature vector of one (H, W) uint8 greyscale image (blocks in ``FEATURE_BLOCKS`` order)."""
    blocks = _feature_blocks(gray_u8)
    # A uniform image (blank, saturated, a failed acquisition) has no skewness, kurtosis or GLCM
    # correlation (0/0): defined as 0 so that one such image cannot stop the SVM (NaN input).
    return np.nan_to_num(np.concatenate([blocks[b] for b in FEATURE_BLOCKS]),
                         nan=0.0, posinf=0.0, neginf=0.0).astype(np.float32)


@lru_cache(maxsize=1)
def block_slices() -> dict[str, slice]:
    """Columns of each block in ``texture_features`` (the sizes do not depend on the image)."""
    blocks = _feature_blocks(np.zeros((64, 64), np.uint8))
    out, start = {}, 0
    for b in FEATURE_BLOCKS:
        out[b] = slice(start, start + len(blocks[b]))
        start += len(blocks[b])
    return out


def feature_set_columns(feature_set) -> np.ndarray:
    """Column indices of a set of block names, e.g. ``("lbp", "glcm")``."""
    unknown = set(feature_set) - set(FEATURE_BLOCKS)
    if unknown or not feature_set:
        raise ValueError(f"feature set {list(feature_set)}: use a non-empty subset of {list(FEATURE_BLOCKS)}")
    sl = block_slices()
    return np.concatenate([np.arange(sl[b].start, sl[b].stop) for b in FEATURE_BLOCKS if b in feature_set])


def texture_feature_matrix(images_u8: np.ndarray, n_jobs: int = 2) -> np.ndarray:
    """(N, F) features for (N, 3, H, W) uint8 images (greyscale = channel mean)."""
    grays = [img.mean(axis=0).astype(np.uint8) for img in images_u8]
    try:
        rows = Parallel(n_jobs=n_jobs)(delayed(texture_features)(g) for g in grays)
    finally:
        # joblib keeps its worker processes alive for minutes; a process that waits for its
        # children at exit (a Dagster step) would hang until they time out.
        get_reusable_executor().shutdown(wait=True)
    return np.stack(rows)


def svm_model(c: float):
    """The baseline's classifier: standardised features, RBF SVM, balanced class weights."""
    return make_pipeline(StandardScaler(), SVC(C=c, kernel="rbf", class_weight="balanced",
                                               decision_function_shape="ovr"))


def svm_scores(model, x: np.ndarray, num_classes: int) -> np.ndarray:
    """(N, num_classes) ranking scores; classes unseen in training rank last."""
    dec = model.decision_function(x)
    classes = model.classes_
    if dec.ndim == 1:  # two classes seen
        dec = np.stack([-dec, dec], axis=1)
    out = np.full((len(x), num_classes), -1e9, dtype=np.float64)
    out[:, classes] = dec
    return out
