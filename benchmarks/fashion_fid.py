"""Fashion-MNIST FID's yardstick: its classifier's accuracy, the test-vs-train floor and noise.

Needs Debian's dataset-fashion-mnist (or --folder with the four idx .gz files). The classifier
(consistency/measure/digits.py FASHION_HPARAMS) is trained once and cached in --cache.
"""

import argparse
import json
import pathlib
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # configs/ is not installed
from configs import _fashion
from consistency.experiment import evaluate
from consistency.io import sharding
from consistency.measure import digits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cache", default="runs/fashion_fid_cache", help="classifier cache dir")
    parser.add_argument("--folder", default="", help="the idx .gz files ('' = Debian's folder)")
    args = parser.parse_args()
    hparams = digits.FASHION_HPARAMS
    start = time.perf_counter()
    params = digits.load_or_train(args.cache, hparams, folder=args.folder)
    train_s = time.perf_counter() - start
    config, mesh = _fashion.fashion(), sharding.make_mesh()
    config.data.folder = args.folder
    extract = evaluate.make_extractor(config, pathlib.Path(args.cache))
    train = evaluate.split_features(
        config, "train", extract, mesh, limit=config.eval.reference_limit
    )
    reference = evaluate.reference_statistics(train)
    noise = np.random.default_rng(0).integers(0, 256, (10000, 32, 32, 1), dtype=np.uint8)
    rows = {
        "test split (10,000) vs train 10k": evaluate.split_features(config, "test", extract, mesh),
        "uniform noise (10,000) vs train 10k": evaluate.features_of(noise, extract, mesh, 250),
    }
    results = {name: evaluate.score(f, reference, kind="fashion_mnist") for name, f in rows.items()}
    name = digits.cache_path(args.cache, hparams, folder=args.folder).name
    print(f"classifier {name}: load/train {train_s:.1f} s, hparams {json.dumps(hparams)}")
    accuracy = {
        s: digits.accuracy(params, s, hparams, folder=args.folder) for s in ("train", "test")
    }
    print(f"accuracy: train {accuracy['train']:.4f}  test {accuracy['test']:.4f}")
    print(f"{'set':<36} {'FID':>8} {'IS':>6} {'prec':>6} {'recall':>6} {'KID':>8}")
    for row, m in results.items():
        print(
            f"{row:<36} {m['fid']:>8.2f} {m['is']:>6.2f} {m['precision']:>6.3f} "
            f"{m['recall']:>6.3f} {m['kid']:>8.2f}"
        )
    print(json.dumps({"accuracy": accuracy, **results}))


if __name__ == "__main__":
    main()
