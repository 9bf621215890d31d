"""What each task brings to the shared loop (train/loop.py), looked up by task name: how a
run is set up (model, data, config.json), its batches, its loss, its evaluation and the
holdout it leaves for export. `base.py` holds what they share.

    recipe = recipes.get(task)            # a class: recipe.setup(task, cfg, data, log)
"""

from __future__ import annotations

from finetune.errors import DataError
from finetune.recipes.base import Recipe, Setup, set_trainable, torch_session
from finetune.recipes.classify import (
    AudioClassification,
    ClassifierRecipe,
    ImageClassification,
    TextClassification,
)
from finetune.recipes.dense import DenseRecipe, ObjectDetection, SemanticSegmentation
from finetune.recipes.spans import QuestionAnswering, SpanRecipe, TokenClassification
from finetune.recipes.speech import SpeechRecognition
from finetune.recipes.tabular import MLPRecipe, TabularClassification

RECIPES: dict[str, type] = {
    "image-classification": ImageClassification,
    "text-classification": TextClassification,
    "audio-classification": AudioClassification,
    "token-classification": TokenClassification,
    "question-answering": QuestionAnswering,
    "object-detection": ObjectDetection,
    "semantic-segmentation": SemanticSegmentation,
    "tabular-classification": TabularClassification,
    "speech-recognition": SpeechRecognition,
}


def get(task: str) -> type:
    if task not in RECIPES:
        raise DataError(f"no fine-tuning recipe for task {task!r}; known: {', '.join(RECIPES)}")
    return RECIPES[task]


__all__ = [
    "RECIPES",
    "ClassifierRecipe",
    "DenseRecipe",
    "MLPRecipe",
    "Recipe",
    "Setup",
    "SpanRecipe",
    "get",
    "set_trainable",
    "torch_session",
]
