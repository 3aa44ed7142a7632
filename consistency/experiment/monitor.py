"""eval.every_steps: FID of the EMA params' samples (each eval setting) while the model trains.

The same samples, features and reference as `--mode=eval` of the checkpoint at that step (image k
is fold_in(sampling.seed, k), eval.num_samples of them), so the two print the same FID.
"""

import json
import pathlib
import time

import jax
import numpy as np

from consistency.experiment import evaluate, sample, sampling_spec


class TrainingEval:
    """Scores the EMA copy eval.ema_index every eval.every_steps (and at the last step)."""

    def __init__(self, config, workdir, network, mesh, decode=None):
        e = config.eval
        self.config, self.mesh, self.every = config, mesh, e.every_steps
        self.kind = evaluate.feature_kind(config)
        workdir = pathlib.Path(workdir)
        self.extract = evaluate.make_extractor(config, evaluate.cache_dir(config, workdir))
        self.ref, _ = evaluate.reference(config, workdir, self.extract, mesh, self.kind)
        self.sample_fns = {
            s: sample.make_sample_fn(
                config, network, sampling_spec.sampler(config, s), decode=decode
            )
            for s in e.settings
        }
        self.path = workdir / "eval" / "during_training.json"
        self.record = json.loads(self.path.read_text()) if self.path.exists() else {"steps": {}}

    def due(self, step: int, last: bool) -> bool:
        return self.every > 0 and (step % self.every == 0 or last)

    def __call__(self, step: int, ema_params, writer=None) -> dict[str, dict[str, float]]:
        """{setting: metrics} at `step`; printed in one line, written to TensorBoard
        (eval/SETTING/METRIC) and to WORKDIR/eval/during_training.json with the best step."""
        e, start = self.config.eval, time.time()
        ids = np.arange(e.num_samples)
        results = {}
        for setting, fn in self.sample_fns.items():
            images, labels = evaluate.sample_ids(self.config, fn, ema_params, ids, self.mesh)
            features = evaluate.features_of(images, self.extract, self.mesh, e.batch_size)
            if jax.process_index() == 0:
                labels = evaluate.class_labels(self.config, self.kind, labels)
                results[setting] = evaluate.score(features, self.ref, kind=self.kind, labels=labels)
        if jax.process_index() != 0:
            return results
        self.record["steps"][str(step)] = results
        best = self.record.setdefault("best", {})
        for setting, metrics in results.items():
            if setting not in best or metrics["fid"] < best[setting]["fid"]:
                best[setting] = {"fid": metrics["fid"], "step": step}
            if writer is not None:
                for name, value in metrics.items():
                    writer.add_scalar(f"eval/{setting}/{name}", value, step)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.record, indent=1, sort_keys=True))
        tmp.replace(self.path)
        shown = "  ".join(
            f"[{s}] fid {m['fid']:.2f} (best {best[s]['fid']:.2f} @ {best[s]['step']})"
            for s, m in results.items()
        )
        print(f"eval step {step}: {shown}  ({time.time() - start:.1f} s)", flush=True)
        return results
