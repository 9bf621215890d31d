"""The task registry (DESIGN.md §0): every stage looks a task up here by its name in
config.json / card.json, and never branches on task names itself. Torch-free.

    task = tasks.create(card, tokenizer=tasks.load_tokenizer(folder / "tokenizer", card))
"""

from __future__ import annotations

from importlib import import_module
from pathlib import Path

from tasks.base import Limits, Task
from tasks.errors import UnknownTask

# name → "module:class"; modules import lazily, so a service loads only its own task.
REGISTRY = {
    "image-classification": "tasks.classification:ImageClassification",
    "text-classification": "tasks.classification:TextClassification",
    "token-classification": "tasks.token_classification:TokenClassification",
    "question-answering": "tasks.question_answering:QuestionAnswering",
    "object-detection": "tasks.detection:ObjectDetection",
    "semantic-segmentation": "tasks.segmentation:SemanticSegmentation",
    "tabular-classification": "tasks.tabular:TabularClassification",
    "audio-classification": "tasks.audio:AudioClassification",
    "speech-recognition": "tasks.speech_recognition:SpeechRecognition",
}
DENSE_VISION_TASKS = ("object-detection", "semantic-segmentation")
TABLE_TASKS = ("tabular-classification",)  # finetune/train/tables.py: trees, or an MLP in the loop
TEXT_TASKS = ("text-classification", "token-classification", "question-answering")
AUDIO_TASKS = ("audio-classification",)
# answered by a decoding loop over an encoder and a decoder graph (tasks/decoding.py)
SPEECH_TASKS = ("speech-recognition",)  # transcripts of clips
GENERATIVE_TASKS = SPEECH_TASKS  # answers decoded token by token (tasks/decoding.py)


def get(name: str) -> type[Task]:
    if name not in REGISTRY:
        raise UnknownTask(f"unknown task {name!r}. Known: {', '.join(REGISTRY)}")
    module, _, cls = REGISTRY[name].partition(":")
    return getattr(import_module(module), cls)


def uses_tokenizer(name: str) -> bool:
    return name in TEXT_TASKS


def names_things(name: str) -> bool:
    """Tasks that find names in text (entities), where letter case is a cue."""
    return name == "token-classification"


def uses_tables(name: str) -> bool:
    return name in TABLE_TASKS


def uses_audio(name: str) -> bool:
    return name in AUDIO_TASKS


def hears(name: str) -> bool:
    """Tasks whose inputs are audio clips (a Whisper backbone)."""
    return name in AUDIO_TASKS or name in SPEECH_TASKS


def generates(name: str) -> bool:
    return name in GENERATIVE_TASKS


def load_tokenizer(folder: str | Path, spec: dict):
    """The `tokenizers` tokenizer in `folder`/tokenizer.json, configured from the card."""
    from tasks.common import text_tokenizer

    path = Path(folder) / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file '{path}' is missing")
    if generates(spec["task"]):  # decodes generated ids: no truncation, no padding
        from tokenizers import Tokenizer

        return Tokenizer.from_file(str(path))
    return text_tokenizer(path, spec["preprocessing"])


def create(spec: dict, tokenizer=None, limits: Limits | None = None) -> Task:
    """The task of a card or checkpoint config (`spec["task"]`)."""
    return get(spec["task"])(spec, tokenizer, limits)


__all__ = [
    "REGISTRY",
    "Limits",
    "Task",
    "create",
    "generates",
    "hears",
    "get",
    "load_tokenizer",
    "uses_audio",
    "uses_tokenizer",
    "uses_tables",
]
