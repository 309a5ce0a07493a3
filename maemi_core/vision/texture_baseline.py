"""The classical baseline: hand-crafted texture features (scikit-image) + an SVM (scikit-learn).

Features of the 224x224 greyscale image:
- LBP: rotation-invariant uniform local binary patterns at (P, R) = (8, 1), (16, 2), (24, 3),
  as normalised histograms: micro-texture independent of orientation;
- GLCM: contrast, dissimilarity, homogeneity, energy, correlation and ASM at distances
  1, 2, 4, averaged and ranged over the four directions (so orientation-free);
- HOG on a 112x112 copy: edge layout (busbars, cracks, particle outlines);
- intensity statistics: mean, std, skewness, kurtosis, 5/25/50/75/95 percentiles.
"""

from __future__ import annotations

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


def texture_features(gray_u8: np.ndarray) -> np.ndarray:
    """Feature vector of one (H, W) uint8 greyscale image."""
    feats = []
    for p, r in _LBP:
        codes = local_binary_pattern(gray_u8, p, r, method="uniform")
        hist, _ = np.histogram(codes, bins=p + 2, range=(0, p + 2))
        feats.append(hist / max(hist.sum(), 1))
    q = (gray_u8 // 4).astype(np.uint8)  # 64 grey levels
    glcm = graycomatrix(q, distances=[1, 2, 4], angles=[0, np.pi / 4, np.pi / 2, 3 * np.pi / 4],
                        levels=64, symmetric=True, normed=True)
    for prop in _GLCM_PROPS:
        v = graycoprops(glcm, prop)  # (distances, angles)
        feats.append(v.mean(axis=1))
        feats.append(v.max(axis=1) - v.min(axis=1))
    small = resize(gray_u8, (112, 112), anti_aliasing=True, preserve_range=True)
    feats.append(hog(small, orientations=9, pixels_per_cell=(16, 16), cells_per_block=(2, 2), feature_vector=True))
    g = gray_u8.astype(np.float64).ravel() / 255.0
    feats.append(np.array([g.mean(), g.std(), skew(g), kurtosis(g), *np.percentile(g, [5, 25, 50, 75, 95])]))
    # A uniform image (blank, saturated, a failed acquisition) has no skewness, kurtosis or GLCM
    # correlation (0/0): defined as 0 so that one such image cannot stop the SVM (NaN input).
    return np.nan_to_num(np.concatenate(feats), nan=0.0, posinf=0.0, neginf=0.0).astype(np.float32)


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
