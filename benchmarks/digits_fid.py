"""The digits FID's yardstick: classifier accuracy, the test-vs-train floor and uniform noise."""

import argparse
import json
import pathlib
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # configs/ is not installed
from configs import _digits
from consistency.experiment import evaluate
from consistency.io import sharding
from consistency.measure import digits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cache", default="runs/digits_fid_cache", help="classifier cache dir")
    args = parser.parse_args()
    start = time.perf_counter()
    params = digits.load_or_train(args.cache)
    train_s = time.perf_counter() - start
    config, mesh = _digits.digits(), sharding.make_mesh()
    extract = evaluate.make_extractor(config, args.cache)
    train = evaluate.split_features(config, "train", extract, mesh)
    reference = evaluate.reference_statistics(train)
    noise = np.random.default_rng(0).integers(0, 256, (360, 8, 8, 1), dtype=np.uint8)
    rows = {
        "test split (360) vs train": evaluate.split_features(config, "test", extract, mesh),
        "uniform noise (360) vs train": evaluate.features_of(noise, extract, mesh, 256),
    }
    results = {name: evaluate.score(f, reference, kind="digits") for name, f in rows.items()}
    print(f"classifier {digits.cache_path(args.cache).name}: load/train {train_s:.1f} s")
    print(
        f"accuracy: train {digits.accuracy(params, 'train'):.4f}  "
        f"test {digits.accuracy(params, 'test'):.4f}"
    )
    print(f"{'set':<30} {'FID':>8} {'IS':>6} {'prec':>6} {'recall':>6} {'KID':>8}")
    for name, m in results.items():
        print(
            f"{name:<30} {m['fid']:>8.2f} {m['is']:>6.2f} {m['precision']:>6.3f} "
            f"{m['recall']:>6.3f} {m['kid']:>8.2f}"
        )
    print(json.dumps(results))


if __name__ == "__main__":
    main()
