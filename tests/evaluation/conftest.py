"""A tiny byte-level model, its directory (with the tokenizer) and a little text for the evaluation tests."""

from __future__ import annotations

import json

import pytest
import torch

from ratlm import LanguageModel, preset
from ratlm.checkpoint import save_pretrained
from ratlm.tokenizer import ByteTokenizer

DOCS = [
    "To be, or not to be, that is the question.",
    "All the world's a stage, and all the men and women merely players.",
    "Now is the winter of our discontent.",
]


@pytest.fixture(scope="session")
def tiny_model():
    """rat-tiny with a short training context (16), so that lengths beyond it stay cheap."""
    torch.manual_seed(0)
    return LanguageModel(preset("rat-tiny", layers="rat,swa", window=6, context=16)).eval()


@pytest.fixture(scope="session")
def model_dir(tiny_model, tmp_path_factory):
    directory = tmp_path_factory.mktemp("eval") / "model"
    save_pretrained(tiny_model, directory, tokenizer=ByteTokenizer())
    return directory


@pytest.fixture
def jsonl_file(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    return path
