//! Training loops, evaluation metrics and benchmark reports.
