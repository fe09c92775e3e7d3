"""Measurement script (not a test): how well do the 21 degradation statistics separate the classes?

Synthetic cases at 32³ with half of the moving volumes left undegraded (``none_fraction`` 0.5): 2000 training
cases (split ``train``, seed 11) and 600 held-out cases (split ``test``, seed 7 777 777). A multinomial
logistic regression (scikit-learn, C = 10) on :func:`unifuse.model.degradation_stats.volume_statistics` of
the moving volume alone is fitted on the training cases and scored on the held-out ones, for the four
classes and, per task, for "none" against the task's degradation. Used for docs/network.md. Needs
scikit-learn (``pip install scikit-learn``); about 5 minutes on one core:

    .venv/bin/python docs/probes/degradation_statistics_probe.py
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from unifuse.data.synthetic import TASKS, SyntheticPairs
from unifuse.model.degradation_stats import volume_statistics


def features(split: str, seed: int, n: int):
    cases = SyntheticPairs(split=split, size=32, length=n, seed=seed, none_fraction=0.5)
    x, y, task = [], [], []
    for i in range(n):
        s = cases[i]
        x.append(volume_statistics(s["moving"][None])[0].numpy())
        y.append(int(s["degradation"]))
        task.append(int(s["task"]))
    return np.stack(x), np.array(y), np.array(task)


def main() -> None:
    torch.set_num_threads(1)
    x_train, y_train, t_train = features("train", 11, 2000)
    x_test, y_test, t_test = features("test", 7_777_777, 600)
    scaler = StandardScaler().fit(x_train)
    x_train, x_test = scaler.transform(x_train), scaler.transform(x_test)
    clf = LogisticRegression(C=10, max_iter=10000).fit(x_train, y_train)
    print(f"four classes: held-out accuracy {clf.score(x_test, y_test):.3f} on {len(y_test)} cases")
    for t, name in enumerate(TASKS):
        a, b = t_train == t, t_test == t
        binary = LogisticRegression(C=10, max_iter=10000).fit(x_train[a], y_train[a] > 0)
        print(f"{name}: none vs {TASKS[name].degradation}: {binary.score(x_test[b], y_test[b] > 0):.3f} ({b.sum()} cases)")


if __name__ == "__main__":
    main()
