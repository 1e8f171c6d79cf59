"""What the traffic and the entries teach: suggestions from the question log, and the
knowledge base's lint. Numpy and scikit-learn over stored vectors; no gRPC, no models."""

from supportqa_server.learning.lint import LintOptions, LintReport, lint
from supportqa_server.learning.suggest import Suggestion, SuggestOptions, suggest
from supportqa_server.learning.vectors import EntryRows

__all__ = ["EntryRows", "LintOptions", "LintReport", "Suggestion", "SuggestOptions", "lint",
           "suggest"]
