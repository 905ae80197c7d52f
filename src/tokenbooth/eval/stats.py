"""The benchmarks' arithmetic, shared by DreamBench and toy-bench: DreamBench's aggregation (an image's score,
then a subject's mean over its images, then the bench's mean over subjects) and the bootstrap interval around
the bench's mean. One implementation, so the two benches cannot disagree on the same scores."""

from __future__ import annotations

import numpy as np

RESAMPLES = 1000  # bootstrap resamples: the interval's ends move by about 0.001 between seeds at this count
CONFIDENCE = 0.95
BOOTSTRAP_SEED = 0


def measured(images: list[dict], metric: str) -> list[float]:
    """The metric's values over a subject's images, leaving out those that have none (None or missing)."""
    return [image[metric] for image in images if image.get(metric) is not None]


def mean(values) -> float:
    return float(np.mean(values))


def subject_means(images: list[dict], metrics) -> dict:
    """{metric: the mean over the subject's images}, None for a metric none of its images has."""
    means = {}
    for metric in metrics:
        values = measured(images, metric)
        means[metric] = mean(values) if values else None
    return means


def bench_mean(per_subject: list[list[float]]) -> float:
    """DreamBench's aggregation: the mean over subjects of the mean over each subject's images."""
    return mean([mean(values) for values in per_subject])


def bootstrap_ci(per_subject: list[list[float]], resamples: int = RESAMPLES, seed: int = BOOTSTRAP_SEED,
                 confidence: float = CONFIDENCE) -> list[float]:
    """Percentile interval of `bench_mean` over resamples that draw the subjects with replacement and, within
    every drawn subject, its images (prompts) with replacement: both are samples of what could be asked."""
    rng = np.random.default_rng(seed)
    counts = np.array([len(v) for v in per_subject])
    table = np.zeros((len(per_subject), counts.max()))
    for i, values in enumerate(per_subject):
        table[i, : len(values)] = values
    drawn = rng.integers(len(per_subject), size=(resamples, len(per_subject)))  # subjects
    n = counts[drawn]
    picks = (rng.random((*drawn.shape, counts.max())) * n[..., None]).astype(int)  # images of each drawn subject
    used = np.arange(counts.max()) < n[..., None]  # a subject with n images draws n of them
    means = np.where(used, table[drawn[..., None], picks], 0.0).sum(-1) / n
    tail = 100 * (1 - confidence) / 2
    return [float(x) for x in np.percentile(means.mean(-1), [tail, 100 - tail])]


def figure(per_subject: list[list[float]]) -> dict:
    """{"mean", "ci"} of a metric over subjects (each a list of its images' values); None for both when no
    subject has a value."""
    return {"mean": bench_mean(per_subject), "ci": bootstrap_ci(per_subject)} if per_subject \
        else {"mean": None, "ci": None}
