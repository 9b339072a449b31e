"""Train an RBF SVM on scikit-learn's digits with a seeded split; write metrics.json."""

import argparse
import json
import time

from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from sklearn.svm import SVC


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--C", type=float, required=True)
    ap.add_argument("--gamma", type=float, required=True)
    ap.add_argument("--seed", type=int, required=True)
    args = ap.parse_args()
    X, y = load_digits(return_X_y=True)
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
