"""The two-step sampler's intermediate time chosen by search on FID, as the paper chose its
two-step times: eval setting 'search' (or 'search=lo,hi') of --mode=eval."""

import functools

import jax
import numpy as np
from jax.experimental import multihost_utils

from consistency.experiment import latent, sample, sampling_spec


def ternary_search(fn, lo: int, hi: int) -> tuple[int, dict[int, float]]:
    """argmin of fn over the integers [lo, hi], by ternary search (fn taken as unimodal): the
    best evaluated index and {index: fn(index)} of every index evaluated, in evaluation order."""
    seen = {}

    def f(i):
        if i not in seen:
            seen[i] = float(fn(i))
        return seen[i]

    while hi - lo > 2:
        third = (hi - lo) // 3
        m1, m2 = lo + third, hi - third
        if f(m1) <= f(m2):
            hi = m2 - 1
        else:
            lo = m1 + 1
    for i in range(lo, hi + 1):
        f(i)
    return min(seen, key=seen.get), seen


def search_two_step(config, scorer, *, network, params, step, checkpoint, setting, bounds) -> dict:
    """Ternary search on FID of i in the two-step ts (0, i, N-1) over bounds = (lo, hi), as the
    paper chose its two-step times: {'0,i,N-1': metrics} of every evaluated i, and under
    `setting` the search (range, indices in order, FID per index, best index). One compilation
    serves every i (traced sigmas); every process takes the same path (process 0's FID)."""
    n = config.sampling.steps
    fn = sample.consistency_sampler(config, network)
    results = {}

    def fid(i):
        name = f"0,{i},{n - 1}"
        sampler = sampling_spec.sampler(config, name)
        sigmas = np.asarray(sampler.sigmas, np.float32)
        sample_fn = latent.decoded(functools.partial(fn, sigmas=sigmas), scorer.decode)
        scored = scorer(params, step, checkpoint, name, sampler, sample_fn)
        if scored is not None:
            results[name] = scored
        if jax.process_count() == 1:
            return scored["fid"]
        value = np.asarray(0.0 if scored is None else scored["fid"], np.float32)
        return float(multihost_utils.broadcast_one_to_all(value))

    best, fids = ternary_search(fid, *bounds)
    if jax.process_index() != 0:
        return {}
    for i, value in fids.items():  # FID against the index: one curve per checkpoint step
        scorer.writer.add_scalar(f"eval/{setting}/step_{step}/fid_by_index", value, i)
    scorer.writer.add_scalar(f"eval/{setting}/best_index", best, step)
    scorer.writer.add_scalar(f"eval/{setting}/best_fid", fids[best], step)
    print(f"step {step} {setting}: best two-step ts (0, {best}, {n - 1}), FID {fids[best]:.4g}")
    summary = {
        "range": list(bounds), "evaluated": list(fids), "fid": {str(i): v for i, v in fids.items()},
        "best_index": best, "best_setting": f"0,{best},{n - 1}", "best_fid": fids[best],
    }  # fmt: skip
    return {**results, setting: summary}
