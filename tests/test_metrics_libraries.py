"""compare's task metrics come from scikit-learn and scipy now; they must equal what the
hand-written confusion-matrix code they replaced computed (kept here as the reference),
ties, absent classes, constant predictions and all."""

import math

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from refsim.exporters.comparison import classification_metrics, regression_metrics


def reference_classification(truth, predicted, classes):
    confusion = np.zeros((classes, classes), np.float64)
    np.add.at(confusion, (truth, predicted), 1)
    tp = np.diag(confusion)
    predicted_count, true_count = confusion.sum(axis=0), confusion.sum(axis=1)
    present = true_count > 0
    precision = np.divide(tp, predicted_count, out=np.zeros(classes), where=predicted_count > 0)
    recall = np.divide(tp, true_count, out=np.zeros(classes), where=true_count > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros(classes), where=(precision + recall) > 0)
    n, c = confusion.sum(), tp.sum()
    denominator = math.sqrt((n * n - np.sum(predicted_count ** 2)) * (n * n - np.sum(true_count ** 2)))
    mcc = (c * n - np.sum(predicted_count * true_count)) / denominator if denominator > 0 else 0.0
    return {"accuracy": c / n, "precision": precision[present].mean(), "recall": recall[present].mean(),
            "f1": f1[present].mean(), "mcc": mcc}


def reference_rank(x):
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    values = x[order]
    start = 0
    for i in range(1, len(x) + 1):
        if i == len(x) or values[i] != values[start]:
            ranks[order[start:i]] = (start + i - 1) / 2
            start = i
    return ranks


def reference_pearson(a, b):
    return float("nan") if a.std() == 0 or b.std() == 0 else float(np.corrcoef(a, b)[0, 1])


def same(a, b):
    return (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=1e-12, abs_tol=1e-12)


@settings(max_examples=50, deadline=None)
@given(st.integers(2, 6).flatmap(lambda k: st.tuples(
    st.just(k), st.lists(st.tuples(st.integers(0, k - 1), st.integers(0, k - 1)), min_size=1, max_size=60))))
def test_classification_metrics_equal_the_hand_written_ones(case):
    classes, pairs = case
    truth = np.array([t for t, _ in pairs])
    predicted = np.array([p for _, p in pairs])
    ours = classification_metrics(truth, predicted, classes)
    theirs = reference_classification(truth, predicted, classes)
    for key, value in theirs.items():
        assert same(ours[key], float(value)), (key, ours[key], value)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.integers(-3, 3), st.integers(-3, 3)), min_size=2, max_size=40), st.booleans())
def test_regression_metrics_equal_the_hand_written_ones(pairs, scale):
    truth = np.array([float(t) for t, _ in pairs])
    predicted = np.array([float(p) for _, p in pairs]) * (0.37 if scale else 1.0)
    ours = regression_metrics(truth, predicted)
    assert same(ours["pearson"], reference_pearson(truth, predicted))
    assert same(ours["spearman"], reference_pearson(reference_rank(truth), reference_rank(predicted)))
    assert ours["mse"] == float(np.mean((truth - predicted) ** 2))
