"""Skipping work whose inputs did not change (maemi_core/run_isolation.py: ``reusable``).

An asset computes the fingerprint of its inputs (the upstream stages' data versions, its code
version, the profile fields it reads); when the published copy of its stage was made from the
same inputs, the run adopts it and reports a materialization with the same data version instead
of retraining or re-asking. ``force: true`` in the asset's run config (Launchpad:
``ops: {<asset>: {config: {force: true}}}``) or the run tag ``maemi/force: true`` (every asset of
the run) re-does the work on purpose.
"""

from typing import Optional

import dagster as dg

from maemi_core.run_isolation import adopt, reusable

FORCE_TAG = "maemi/force"


class Recompute(dg.Config):
    force: bool = False    # re-do the work even when its inputs did not change


def reuse_unchanged(context: dg.AssetExecutionContext, cfg, inputs: str,
                    config: Optional[Recompute] = None) -> Optional[dg.MaterializeResult]:
    """A materialization of the published copy when the inputs are unchanged, else None."""
    if (config is not None and config.force) or context.run.tags.get(FORCE_TAG, "").lower() == "true":
        context.log.info("force: recomputing even if the inputs did not change")
        return None
    info = reusable(cfg, inputs)
    if info is None:
        return None
    adopt(cfg, info)
    context.log.info(f"inputs unchanged (fingerprint {inputs}): reusing the copy of run {info['run_scope']} "
                     f"({info['path']}); nothing recomputed")
    return dg.MaterializeResult(data_version=dg.DataVersion(info["data_version"]), metadata={
        "reused": True, "reused_from_run": info["run_scope"], "inputs_fingerprint": inputs,
        "path": dg.MetadataValue.path(info["path"])})
