"""Artifacts (safetensors + JSON, fit checks) and datasets (files, truncation, alignment)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch

from archscope import Artifact, ArtifactFit
from archscope.artifacts import model_identity, weights_hash
from archscope.data import Contrast, Dataset, as_dataset, pad_batch
from archscope.errors import ArtifactError, InputError


@dataclass
class Scaler(Artifact):
    kind: ClassVar[str] = "test-scaler"
    weight: torch.Tensor

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {"weight": self.weight}

    def artifact_config(self) -> dict[str, Any]:
        return {"dim": int(self.weight.shape[0])}

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> Scaler:
        assert tensors["weight"].shape[0] == config["dim"]
        return cls(tensors["weight"])


class FakeBackend:
    def __init__(self, name: str = "fake", dim: int = 4) -> None:
        from archscope import Site, SiteInfo

        self.name = name
        self.model = torch.nn.Linear(dim, dim)
        self._sites = {
            "layer_0.residual": SiteInfo(Site("residual", 0), "token", ("batch", "seq", "d"), dim)
        }

    def sites(self) -> dict[str, Any]:
        return self._sites

    def site_info(self, site: str) -> Any:
        return self._sites[site]


def test_save_and_load_round_trip_bit_exact(tmp_path: Path) -> None:
    backend = FakeBackend()
    art = Scaler(torch.randn(4))
    art.fitted_on = ArtifactFit.of(backend, "layer_0.residual")
    folder = art.save(tmp_path / "scaler")
    assert sorted(p.name for p in folder.iterdir()) == ["artifact.json", "weights.safetensors"]
    meta = json.loads((folder / "artifact.json").read_text())
    assert meta["kind"] == "test-scaler" and meta["fitted_on"]["site"] == "layer_0.residual"
    loaded = Scaler.load(folder, backend=backend)
    assert torch.equal(loaded.weight, art.weight) and loaded.fitted_on == art.fitted_on
    assert isinstance(Artifact.load(folder), Scaler)  # dispatch by kind


def test_load_refuses_a_backend_it_does_not_fit(tmp_path: Path) -> None:
    art = Scaler(torch.randn(4))
    art.fitted_on = ArtifactFit.of(FakeBackend(), "layer_0.residual")
    folder = art.save(tmp_path / "a")
    with pytest.raises(ArtifactError, match=r"backend 'other' \(fitted on 'fake'\)"):
        Scaler.load(folder, backend=FakeBackend("other"))
    with pytest.raises(ArtifactError, match="has dimension 8 \\(fitted on 4\\)"):
        Scaler.load(folder, backend=FakeBackend(dim=8))


def test_load_refuses_malformed_folders(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="is not a saved archscope artifact"):
        Scaler.load(tmp_path)
    folder = Scaler(torch.randn(2)).save(tmp_path / "b")
    (folder / "weights.safetensors").write_bytes(b"garbage")
    with pytest.raises(ArtifactError, match="cannot read"):
        Scaler.load(folder)


def test_model_identity_and_weights_hash_follow_the_model() -> None:
    torch.manual_seed(0)
    a, b = torch.nn.Linear(3, 3), torch.nn.Linear(3, 3)
    assert model_identity(a) == model_identity(b)
    assert weights_hash(a) != weights_hash(b)
    b.load_state_dict(a.state_dict())
    assert weights_hash(a) == weights_hash(b)


def test_dataset_files(tmp_path: Path) -> None:
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text('{"text": "a b", "label": 1}\n\n{"text": "c", "label": 0}\n')
    ds = Dataset.from_file(jsonl)
    assert ds.texts == ["a b", "c"] and ds.labels == [1, 0]
    csv_file = tmp_path / "d.csv"
    csv_file.write_text("text,label\nhello there,1\nbye,0\n")
    assert Dataset.from_file(csv_file).labels == [1, 0]
    plain = tmp_path / "d.txt"
    plain.write_text("one\ntwo\n")
    assert Dataset.from_file(plain).texts == ["one", "two"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"txt": 1}\n')
    with pytest.raises(InputError, match="bad.jsonl:1: each line needs an object with a 'text'"):
        Dataset.from_file(bad)
    half = tmp_path / "half.csv"
    half.write_text("text,label\na,1\nb,\n")
    with pytest.raises(InputError, match="1 of 2 rows have a label"):
        Dataset.from_file(half)


def test_texts_are_never_cut_silently() -> None:
    from archscope_transformer.testing import tiny_tokenizer

    long = " ".join(["w5"] * 50)
    ds = Dataset.from_texts([long, "w6"], tokenizer=tiny_tokenizer())
    assert len(ds.ids()[0]) == 50
    cut = Dataset.from_texts([long, "w6"], tokenizer=tiny_tokenizer(), max_length=10)
    with pytest.warns(UserWarning, match="1 of 2 texts are longer than max_length=10"):
        assert len(cut.ids()[0]) == 10


def test_dataset_checks_and_subsets() -> None:
    with pytest.raises(InputError, match="3 labels for 2 items"):
        Dataset.from_ids([[1], [2]], labels=[0, 1, 1])
    with pytest.raises(InputError, match="empty"):
        Dataset.from_ids([])
    ds = Dataset.from_ids([[1], [2, 3], [4]], labels=[0, 1, 0])
    sub = ds.subset([2, 1])
    assert sub.ids() == [[4], [2, 3]] and sub.labels == [0, 1]
    left = pad_batch([[1], [2, 3]], side="left")
    assert left["attention_mask"].tolist() == [[0, 1], [1, 1]]
    assert as_dataset(left).ids() == [[1], [2, 3]]
    with pytest.raises(InputError, match="as many corrupted inputs as clean"):
        Contrast(["a"], ["b", "c"])


def test_subsets_and_relabelling_after_tokenizing_keep_the_tokens() -> None:
    from archscope_transformer.testing import tiny_tokenizer

    ds = Dataset.from_texts(["w5 w6", "w7", "w8 w9 w10"], [0, 1, 0], tokenizer=tiny_tokenizer())
    ids = ds.ids()
    sub = ds.subset([2, 0])
    assert sub.texts == ["w8 w9 w10", "w5 w6"] and sub.ids() == [ids[2], ids[0]]
    assert ds.with_labels([1, 1, 1]).ids() == ids
