"""Editing and general-ability metrics: batched answer scoring, torchmetrics Metrics, downstream tasks (data and
scoring rules in ``tasks``, model calls and Metrics in ``downstream``), final table."""

from .downstream import (
    GenerationAccuracy,
    NLIAccuracy,
    QAAccuracy,
    RougeF1,
    TaskAccuracy,
    TextPerplexity,
    TokenPerplexity,
    generate,
    text_nll,
)
from .editing import (
    CaseMean,
    Efficacy,
    EditScores,
    Generalization,
    Locality,
    LocalityAgreement,
    TokenAccuracy,
    neighborhood_predictions,
    request_case_values,
    score_requests,
)
from .report import FinalMetricsReporter, format_table, write_final_metrics
from .scoring import AnswerScores, score_answers
from .tasks import load_examples, normalize_answer, parse_true_false, qa_exact_match

__all__ = [
    "AnswerScores",
    "CaseMean",
    "EditScores",
    "Efficacy",
    "FinalMetricsReporter",
    "Generalization",
    "GenerationAccuracy",
    "Locality",
    "LocalityAgreement",
    "NLIAccuracy",
    "QAAccuracy",
    "RougeF1",
    "TaskAccuracy",
    "TextPerplexity",
    "TokenAccuracy",
    "TokenPerplexity",
    "format_table",
    "generate",
    "load_examples",
    "neighborhood_predictions",
    "normalize_answer",
    "parse_true_false",
    "qa_exact_match",
    "request_case_values",
    "score_answers",
    "score_requests",
    "text_nll",
    "write_final_metrics",
]
