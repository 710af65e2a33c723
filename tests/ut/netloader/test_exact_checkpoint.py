"""An exact checkpoint fingerprint (issue 27, item 4): from a Hugging Face cache
snapshot's blob names without reading a byte, or from the manifest `netloader-digest`
wrote while it is fresh; else none, with the reason in the log. It goes in the identity
beside the sampled one and is compared where both sides have one."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from vllm_ascend.model_loader.netloader.exact_checkpoint import (
    MANIFEST_NAME,
    MAX_MANIFEST_BYTES,
    ExactFingerprint,
    exact_fingerprint,
)
from vllm_ascend.model_loader.netloader.fleet.registry import model_key
from vllm_ascend.model_loader.netloader.identity import (
    SAMPLE_BYTES,
    CheckpointError,
    checkpoint_fingerprint,
    identity_difference,
    weight_files,
)
from vllm_ascend.model_loader.netloader.plan import checkpoint_ids

NAMES = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")


def write_checkpoint(folder: Path) -> list[Path]:
    """Two safetensors shards; the second holds one 1 MiB tensor."""
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    save_file({"a": torch.randn(64, 64, generator=gen)}, str(folder / NAMES[0]))
    save_file({"b": torch.randn(512, 512, generator=gen)}, str(folder / NAMES[1]))
    index = {"weight_map": {"a": NAMES[0], "b": NAMES[1]}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return [folder / n for n in NAMES]


def to_hub_cache(plain: Path, cache: Path) -> Path:
    """``plain``'s files as the hub client stores them: blobs/<sha256> for each weight
    file (an LFS file), blobs/<git sha1> for the index, a snapshot of links."""
    blobs, snapshot = cache / "blobs", cache / "snapshots" / ("0" * 40)
    blobs.mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    for f in plain.iterdir():
        data = f.read_bytes()
        name = (hashlib.sha256(data).hexdigest() if f.suffix == ".safetensors"
                else hashlib.sha1(data).hexdigest())
        (blobs / name).write_bytes(data)
        (snapshot / f.name).symlink_to(Path("../../blobs") / name)
    return snapshot


def flip_unsampled_byte(path: Path) -> None:
    """Change one byte of the tensor data where no sample of the sampled fingerprint
    looks (a quarter into a 1 MiB tensor: samples are its first, middle and last 4 KiB)."""
    data = bytearray(path.read_bytes())
    header = int.from_bytes(data[:8], "little")
    at = 8 + header + (512 * 512 * 4) // 4
    assert at > 8 + header + SAMPLE_BYTES
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


def files_of(folder: Path) -> list[str]:
    return weight_files(str(folder))


def ids_of(folder: Path) -> tuple[str | None, str | None]:
    """(sampled, exact) as the loader computes them for the identity."""
    return checkpoint_ids(SimpleNamespace(model=str(folder), revision=None), None, "test")


def fingerprint_of(folder: Path) -> str | None:
    return ids_of(folder)[1]


def sampled_of(folder: Path) -> str:
    return checkpoint_fingerprint(files_of(folder))


def test_a_hub_snapshot_is_fingerprinted_exactly_from_its_blob_names(tmp_path):
    write_checkpoint(tmp_path / "plain")
    snapshot = to_hub_cache(tmp_path / "plain", tmp_path / "hub")
    exact = exact_fingerprint(files_of(snapshot), sampled_of(snapshot))
    assert isinstance(exact, ExactFingerprint) and exact.source == "hub cache"
    # Both go in the identity: the sampled one for every peer, the exact one beside it.
    assert ids_of(snapshot) == (sampled_of(snapshot), exact.value)
    assert exact.value != sampled_of(snapshot)
    # The plain directory the snapshot was made from has no exact one.
    assert ids_of(tmp_path / "plain") == (sampled_of(tmp_path / "plain"), None)


def test_no_byte_of_a_hub_blob_is_read(tmp_path):
    """Blobs whose content is no safetensors file at all: the sampled fingerprint fails
    on them, the exact one never opens them."""
    write_checkpoint(tmp_path / "plain")
    snapshot = to_hub_cache(tmp_path / "plain", tmp_path / "hub")
    for f in files_of(snapshot):
        blob = Path(os.path.realpath(f))
        blob.write_bytes(b"\xff" * blob.stat().st_size)
    with pytest.raises(CheckpointError):
        checkpoint_fingerprint(files_of(snapshot))
    assert isinstance(exact_fingerprint(files_of(snapshot), "0" * 64), ExactFingerprint)


def test_one_changed_byte_changes_the_exact_fingerprint_where_the_sampled_one_is_blind(
        tmp_path):
    write_checkpoint(tmp_path / "v1")
    shutil.copytree(tmp_path / "v1", tmp_path / "v2")
    flip_unsampled_byte(tmp_path / "v2" / NAMES[1])
    # What the caveat says: the sampled fingerprint cannot tell them apart.
    assert sampled_of(tmp_path / "v1") == sampled_of(tmp_path / "v2")
    one = to_hub_cache(tmp_path / "v1", tmp_path / "hub1")
    two = to_hub_cache(tmp_path / "v2", tmp_path / "hub2")  # the blob's name changed
    assert fingerprint_of(one) != fingerprint_of(two)


def netloader_digest(folder: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "vllm_ascend.model_loader.netloader.exact_checkpoint",
         str(folder)], capture_output=True, text=True, timeout=120, check=False)


def test_netloader_digest_gives_a_plain_directory_the_hub_caches_fingerprint(tmp_path):
    write_checkpoint(tmp_path / "plain")
    snapshot = to_hub_cache(tmp_path / "plain", tmp_path / "hub")
    assert fingerprint_of(tmp_path / "plain") is None
    done = netloader_digest(tmp_path / "plain")
    assert done.returncode == 0, done.stderr
    manifest = json.loads((tmp_path / "plain" / MANIFEST_NAME).read_text())
    assert sorted(manifest["files"]) == sorted(NAMES)
    # The same files, the same exact fingerprint, from either source.
    assert done.stdout.strip() == fingerprint_of(tmp_path / "plain") == fingerprint_of(snapshot)
    # A snapshot needs no manifest.
    hub = netloader_digest(snapshot)
    assert hub.returncode == 0 and hub.stdout.strip() == fingerprint_of(snapshot)
    assert not (snapshot / MANIFEST_NAME).exists()


@pytest.mark.parametrize("change", ["touched", "rewritten", "same mtime", "new file"])
def test_a_stale_manifest_is_ignored(tmp_path, change, caplog):
    folder = tmp_path / "m"
    files = write_checkpoint(folder)
    assert netloader_digest(folder).returncode == 0
    if change == "touched":
        os.utime(files[0], ns=(0, files[0].stat().st_mtime_ns + 10**9))
    elif change == "rewritten":
        flip_unsampled_byte(files[1])
    elif change == "same mtime":
        # Other weights of the same sizes under normalised mtimes (a reproducible
        # build): size and mtime match, the samples do not.
        mtime = files[0].stat().st_mtime_ns
        save_file({"a": torch.ones(64, 64)}, str(files[0]))
        os.utime(files[0], ns=(mtime, mtime))
    else:
        save_file({"c": torch.zeros(4)}, str(folder / "model-00003-of-00003.safetensors"))
        index = json.loads((folder / "model.safetensors.index.json").read_text())
        index["weight_map"]["c"] = "model-00003-of-00003.safetensors"
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    reason = exact_fingerprint(files_of(folder), sampled_of(folder))
    assert isinstance(reason, str) and "is stale" in reason
    with caplog.at_level("INFO"):
        assert ids_of(folder) == (sampled_of(folder), None)
    assert "no exact one" in caplog.text and "is stale" in caplog.text


def manifest(entry: dict, sampled: object = "0" * 64) -> bytes:
    return json.dumps({"format": "netloader-digests-v1", "sampled": sampled,
                       "files": {NAMES[0]: entry}}).encode()


GOOD = {"size": 1, "mtime_ns": 1, "sha256": "a" * 64}


@pytest.mark.parametrize("content, why", [
    (b"{", "not JSON"),
    (b"[]", "not a netloader-digests-v1 manifest"),
    (manifest({**GOOD, "sha256": "x"}), "malformed"),
    (manifest({**GOOD, "size": True}), "malformed"),
    (manifest(GOOD, sampled=None), "no 'sampled'"),
    (b" " * (MAX_MANIFEST_BYTES + 1), "over"),
    (b"[" * 100_000 + b"]" * 100_000, "not JSON"),
    (None, "not a regular file"),  # a FIFO: must not hold start-up
])
def test_a_malformed_manifest_is_ignored_by_name(tmp_path, content, why):
    folder = tmp_path / "m"
    write_checkpoint(folder)
    if content is None:
        os.mkfifo(folder / MANIFEST_NAME)
    else:
        (folder / MANIFEST_NAME).write_bytes(content)
    reason = exact_fingerprint(files_of(folder), sampled_of(folder))
    assert isinstance(reason, str) and why in reason
    assert ids_of(folder) == (sampled_of(folder), None)


def test_a_snapshot_whose_weights_are_not_content_named_blobs_is_sampled(tmp_path):
    """A weight file stored as a git blob (not LFS: named by a sha1) has no sha256."""
    write_checkpoint(tmp_path / "plain")
    snapshot = to_hub_cache(tmp_path / "plain", tmp_path / "hub")
    link = snapshot / NAMES[0]
    target = Path(os.path.realpath(link))
    renamed = target.with_name(hashlib.sha1(target.read_bytes()).hexdigest())
    target.rename(renamed)
    link.unlink()
    link.symlink_to(Path("../../blobs") / renamed.name)
    reason = exact_fingerprint(files_of(snapshot), sampled_of(snapshot))
    assert isinstance(reason, str)
    assert ids_of(snapshot) == (sampled_of(snapshot), None)


def test_the_exact_fingerprint_is_compared_only_where_both_sides_have_one():
    """Peers without one (an older release, storage that is not digested) still match
    on the sampled fingerprint; two exact ones must be equal; the registry's model key
    does not change with it."""
    base = {"model": "m", "checkpoint": "c" * 64, "checkpoint_exact": None}
    exact = {**base, "checkpoint_exact": "e" * 64}
    assert identity_difference(exact, base) is None
    assert identity_difference(base, {k: v for k, v in exact.items()
                                      if k != "checkpoint_exact"}) is None
    assert "checkpoint_exact" in identity_difference(exact, {**exact,
                                                             "checkpoint_exact": "f" * 64})
    assert model_key(exact) == model_key(base) == model_key(
        {k: v for k, v in base.items() if k != "checkpoint_exact"})
