"""toy-bench v2: the paper's Table 1 and its ablations, asked of mini on a CPU (`tokenbooth eval toybench`).
What it asks, how it scores and the run folder's layout: docs/toybench/README.md. tasks.py holds the subjects,
references and prompts; run.py trains, draws and scores (reusing whatever is whole on restart); summary.py
makes the figures (eval/stats.py's aggregation); report.py writes report.md and report.png."""

from ..stats import BOOTSTRAP_SEED, CONFIDENCE, RESAMPLES, bench_mean, bootstrap_ci
from .report import bar_plot, markdown
from .run import Bench, check_settings, reader_scores, reading_scores, run_toybench
from .summary import COMPARED, COMPARISONS, attribute_shares, goals, paired_differences, subject_means, summarize
from .tasks import (EXTRAS, HEADINGS, LABELS, METRICS, NEW_BACKGROUNDS, NEW_COLORS, ORACLE, PLACEHOLDER, RECIPES,
                    REFERENCE_SHOTS, REFERENCE_SIZE, ROWS, SPLITS, STAGE1_ROW, VALIDATION_PROMPTS, WORDS,
                    ToyBenchConfig, check_rows, class_prompt, prompted_scenes, prompts, reference_scenes, references,
                    subjects, validation_prompts, worded_prompt, words_fit)
