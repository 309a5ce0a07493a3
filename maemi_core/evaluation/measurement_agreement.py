"""Do the answers state the measured numbers? For every text record whose reference (the
measurement teacher's answer) states a quantity such as the median fibre diameter, the stated
value in a method's answer is compared with the reference's: within a relative tolerance
(:data:`TOLERANCE`, 20%) or not, and a record whose answer states no value counts as a miss.
METEOR cannot tell "median fibre diameter 5.7 px" from "median fibre diameter 57 px"; this table
can.

The patterns follow the sentences of :mod:`maemi_core.teacher.measurement_teacher`; a reference
that states none of them (another teacher, another prompt pack) gives no rows.
"""

from __future__ import annotations

import re
from typing import Optional

import numpy as np
import pandas as pd

from maemi_core.evaluation.benchmark_tables import bootstrap_ci

_NUM = r"(\d+(?:\.\d+)?)"
_UNIT = r"\s*(px|nm|um|µm)\b"
# quantity -> patterns; each pattern's first group is the number, the optional second the unit
QUANTITIES: dict[str, list[str]] = {
    "fibre_diameter": [rf"median fibre diameter (?:of )?{_NUM}{_UNIT}", rf"median width (?:of )?{_NUM}{_UNIT}"],
    "fibre_coverage": [rf"fibre network covering {_NUM}% of the area"],
    "bead_count": [rf"\b{_NUM} beads?\b", r"\b(No) beads\b"],
    "bead_diameter": [rf"median bead diameter (?:of )?{_NUM}{_UNIT}"],
    "particle_diameter": [rf"median equivalent diameter (?:of )?{_NUM}{_UNIT}"],
    "orientation_coherence": [rf"orientation coherence {_NUM}"],
}
_TO_NM = {"nm": 1.0, "um": 1000.0, "µm": 1000.0}
TOLERANCE = 0.2     # relative: a stated value within 20% of the reference's counts as right


def stated(text: str, quantity: str) -> Optional[tuple[float, str]]:
    """The first value of ``quantity`` that ``text`` states, as ``(value, unit)`` with lengths in nm
    when a physical unit is given ('px' stays pixels, '' for unitless), or None."""
    best: Optional[tuple[int, float, str]] = None
    text = text if isinstance(text, str) else ""        # an empty answer read back from CSV is NaN
    for pattern in QUANTITIES[quantity]:
        m = re.search(pattern, text, flags=re.IGNORECASE)
        if not m or (best is not None and m.start() >= best[0]):
            continue
        value = 0.0 if m.group(1).lower() == "no" else float(m.group(1))
        unit = (m.group(2) or "").lower() if m.lastindex and m.lastindex >= 2 else ""
        if unit in _TO_NM:
            value, unit = value * _TO_NM[unit], "nm"
        best = (m.start(), value, unit)
    return None if best is None else (best[1], best[2])


def agreement_samples(samples: pd.DataFrame, tolerance: float = TOLERANCE) -> pd.DataFrame:
    """One row per (method, record, quantity) whose reference states the quantity: the reference's
    and the answer's value, their relative error and whether it is within ``tolerance``."""
    rows = []
    for _, s in samples.iterrows():
        for q in QUANTITIES:
            ref = stated(s["reference"], q)
            if ref is None:
                continue
            got = stated(s["answer"], q)
            if got is None or got[1] != ref[1]:
                rel = float("nan")
                within = False
            else:
                rel = abs(got[0] - ref[0]) / abs(ref[0]) if ref[0] else (0.0 if got[0] == 0 else float("inf"))
                within = bool(rel <= tolerance + 1e-9)
            rows.append({"method": s["method"], "record_id": s["record_id"], "quantity": q,
                         "reference_value": ref[0], "unit": ref[1], "stated_value": None if got is None else got[0],
                         "stated": got is not None, "relative_error": rel, "within_tolerance": within})
    return pd.DataFrame(rows, columns=["method", "record_id", "quantity", "reference_value", "unit", "stated_value",
                                       "stated", "relative_error", "within_tolerance"])


def agreement_table(samples_by_table: dict[str, pd.DataFrame], tolerance: float = TOLERANCE) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per text table, method and quantity: the records whose reference states it (``n``), the share
    of answers that state it, the share within ``tolerance`` with its 95% bootstrap interval, and the
    median relative error of the stated values. Also returns the per-record rows."""
    per_record, rows = [], []
    for table, samples in samples_by_table.items():
        if samples is None or not len(samples):
            continue
        a = agreement_samples(samples, tolerance)
        if not len(a):
            continue
        a.insert(0, "table", table)
        per_record.append(a)
        for (method, q), g in a.groupby(["method", "quantity"], sort=True):
            hit = g["within_tolerance"].to_numpy(dtype=float)
            lo, hi = bootstrap_ci(hit)
            err = g["relative_error"].to_numpy(dtype=float)
            err = err[np.isfinite(err)]
            rows.append({"table": table, "method": method, "quantity": q, "n": int(len(g)),
                         "stated": float(g["stated"].mean()), "within_tolerance": float(hit.mean()),
                         "within_ci_low": lo, "within_ci_high": hi,
                         "median_relative_error": float(np.median(err)) if err.size else float("nan")})
    cols = ["table", "method", "quantity", "n", "stated", "within_tolerance", "within_ci_low", "within_ci_high",
            "median_relative_error"]
    return (pd.DataFrame(rows, columns=cols),
            pd.concat(per_record, ignore_index=True) if per_record else pd.DataFrame())
