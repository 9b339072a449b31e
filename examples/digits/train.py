"""Train an RBF SVM on the digits data with a seeded split; write metrics.json.

The data file is scikit-learn's own copy of the UCI digits (``load_digits`` reads the same
bytes); the experiment declares it as an input, so its content hash is in every run's record.
"""

import argparse
import json
import time

import numpy as np
from sklearn.model_selection import train_test_split
from sklearn.svm import SVC


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--C", type=float, required=True)
    ap.add_argument("--gamma", type=float, required=True)
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--data", required=True, help="digits.csv.gz: 64 pixel columns, then the label")
    args = ap.parse_args()
    raw = np.loadtxt(args.data, delimiter=",")
    X, y = raw[:, :-1], raw[:, -1].astype(int)
    X_train, X_test, y_train, y_test = train_test_split(
        X, y, test_size=0.3, random_state=args.seed, stratify=y
    )
    start = time.perf_counter()
    model = SVC(C=args.C, gamma=args.gamma).fit(X_train, y_train)
    fit_seconds = time.perf_counter() - start
    metrics = {
        "accuracy": round(float(model.score(X_test, y_test)), 6),
        "train_accuracy": round(float(model.score(X_train, y_train)), 6),
        "support_vectors": int(model.n_support_.sum()),
    }
    with open("metrics.json", "w") as f:
        json.dump(metrics, f, sort_keys=True)
    print(json.dumps({**metrics, "fit_seconds": round(fit_seconds, 3)}))


if __name__ == "__main__":
    main()
