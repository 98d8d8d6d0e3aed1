"""Sample-quality evaluators of generated latents (one per data source) and their building blocks."""

from lightning_ar.metrics.base import SampleEvaluator
from lightning_ar.metrics.conditional_accuracy import ConditionalAccuracy
from lightning_ar.metrics.digits import DigitsEvaluator
from lightning_ar.metrics.digits_classifier import (
    DigitsClassifier,
    load_or_train_digits_classifier,
    train_digits_classifier,
)
from lightning_ar.metrics.gmm import GMMEvaluator

__all__ = [
    "ConditionalAccuracy",
    "DigitsClassifier",
    "DigitsEvaluator",
    "GMMEvaluator",
    "SampleEvaluator",
    "load_or_train_digits_classifier",
    "train_digits_classifier",
]
