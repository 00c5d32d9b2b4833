"""Findings of the hostile tour about the activation store: a shard with flipped bytes read
back as if intact, a deleted shard leaving ``complete`` True, and raw FileNotFoundError /
SafetensorError from ``read()`` and `StoreReader`. Each test asserts the message or the
corrected value."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from archs import arch, words

from archscope.apps.store import ActivationStore, StoreError, StoreReader, extract

SITE = "layer_1.residual"


@pytest.fixture
def store(tmp_path: Path) -> ActivationStore:
    a = arch("gpt2")
    return extract(
        a.backend,
        words(12, seed=5),
        [SITE],
        tmp_path / "s",
        tokenizer=a.tokenizer,
        docs_per_shard=4,
        progress=False,
    )


def _shard(store: ActivationStore, index: int = 1) -> Path:
    return store.path / store.manifest.shards[index].file


def _flip_last_bytes(path: Path, n: int = 16) -> None:
    data = bytearray(path.read_bytes())
    for i in range(len(data) - n, len(data)):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def test_read_refuses_a_shard_whose_bytes_were_flipped(store: ActivationStore) -> None:
    before = store.read(SITE)
    _flip_last_bytes(_shard(store))
    reopened = ActivationStore(store.path)
    with pytest.raises(StoreError, match=r"shard-000001.*checksum differs.*extraction again"):
        reopened.read(SITE)
    assert reopened.verify() == ["shard-000001.safetensors: checksum differs from the manifest"]
    # the flip is in the data, so without the checksum the values would come back changed
    assert not torch.equal(reopened.read(SITE, checksum=False), before)


def test_deleted_shard_makes_the_store_incomplete_and_reads_say_what_to_do(
    store: ActivationStore,
) -> None:
    assert store.info().complete
    _shard(store).unlink()
    reopened = ActivationStore(store.path)
    info = reopened.info()
    assert not info.complete and not reopened.complete
    assert info.shards_written == 2 and "INCOMPLETE (2/3 shards" in info.to_markdown()
    with pytest.raises(StoreError, match=r"shard-000001.safetensors.*missing.*extraction again"):
        reopened.read(SITE)
    with pytest.raises(StoreError, match=r"1 shard files the manifest lists are missing"):
        StoreReader(store.path, SITE)
    reader = StoreReader(store.path, SITE, batch_size=8, allow_incomplete=True)
    with pytest.raises(StoreError, match=r"shard-000001.safetensors.*missing"):
        list(reader)


def test_truncated_shard_gives_a_store_error_naming_it(store: ActivationStore) -> None:
    path = _shard(store)
    path.write_bytes(path.read_bytes()[:-100])
    reopened = ActivationStore(store.path)
    with pytest.raises(StoreError, match=r"shard-000001.*bytes, but the manifest recorded"):
        reopened.read(SITE)
    with pytest.raises(StoreError, match=r"shard-000001.*truncated or replaced"):
        list(StoreReader(reopened, SITE, batch_size=8))
    assert "truncated" in reopened.verify()[0]


def test_shard_with_a_damaged_header_is_named(store: ActivationStore) -> None:
    path = _shard(store, 0)
    data = bytearray(path.read_bytes())
    data[8:12] = b"\xff\xfe\x00\x01"  # the header's JSON starts at byte 8
    path.write_bytes(bytes(data))
    with pytest.raises(StoreError, match=r"shard-000000.*header is not valid JSON"):
        ActivationStore(store.path).shard(0)


def test_resume_rewrites_a_deleted_shard_as_the_message_says(store: ActivationStore) -> None:
    want = store.read(SITE)
    _shard(store).unlink()
    a = arch("gpt2")
    again = extract(
        a.backend,
        words(12, seed=5),
        [SITE],
        store.path,
        tokenizer=a.tokenizer,
        docs_per_shard=4,
        progress=False,
    )
    assert again.complete and again.verify() == []
    assert torch.equal(again.read(SITE), want)
