"""Sample-quality evaluators of generated latents (one per data source) and their building blocks."""

from lightning_ar.metrics.base import SampleEvaluator
from lightning_ar.metrics.conditional_accuracy import ConditionalAccuracy
from lightning_ar.metrics.digits import DigitsEvaluator
from lightning_ar.metrics.digits_classifier import (
    DigitsClassifier,
    load_or_train_digits_classifier,
    train_digits_classifier,
)
from lightning_ar.metrics.evaluate import evaluate_npz
from lightning_ar.metrics.fid_stats import ReferenceStatsFID, frechet_distance, load_reference_stats
from lightning_ar.metrics.gmm import GMMEvaluator
from lightning_ar.metrics.image_quality import ImageQualityEvaluator
from lightning_ar.metrics.inception import InceptionFeatures
from lightning_ar.metrics.precision_recall import ImprovedPrecisionRecall, precision_recall
from lightning_ar.metrics.registry import evaluator_for, register_evaluator

__all__ = [
    "ConditionalAccuracy",
    "DigitsClassifier",
    "DigitsEvaluator",
    "GMMEvaluator",
    "ImageQualityEvaluator",
    "ImprovedPrecisionRecall",
    "InceptionFeatures",
    "ReferenceStatsFID",
    "SampleEvaluator",
    "evaluate_npz",
    "evaluator_for",
    "frechet_distance",
    "load_reference_stats",
    "load_or_train_digits_classifier",
    "precision_recall",
    "register_evaluator",
    "train_digits_classifier",
]
