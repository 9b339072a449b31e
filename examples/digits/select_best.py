"""Read every trial's metrics (listed by stowplan in $STOWPLAN_UPSTREAM) and report the best."""

import json
import os


def main() -> None:
    with open(os.environ["STOWPLAN_UPSTREAM"]) as f:
        upstream = json.load(f)
    trials = []
    for run in upstream:
        with open(run["outputs"]["metrics.json"]) as f:
            metrics = json.load(f)
        trials.append((metrics["accuracy"], run["params"], run["run_id"]))
    # best accuracy; ties go to the smaller C, then the smaller gamma (the simpler model)
    trials.sort(key=lambda t: (-t[0], t[1]["C"], t[1]["gamma"]))
    accuracy, params, run_id = trials[0]
    best = {"accuracy": accuracy, "C": params["C"], "gamma": params["gamma"],
            "trials": len(trials), "best_run": run_id[:12]}
    with open("best.json", "w") as f:
        json.dump(best, f, sort_keys=True)
    print(json.dumps(best))


if __name__ == "__main__":
    main()
