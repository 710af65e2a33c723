"""An exact checkpoint fingerprint from whole-file content hashes that already exist.

The sampled fingerprint (``identity.checkpoint_fingerprint``) reads a few samples of
every tensor: two checkpoints that differ only where no sample looks share it. Two
sources give every byte's identity without reading a byte at load time:

- **A Hugging Face cache snapshot.** The hub client stores each file once, as
  ``blobs/<name>``, and links ``snapshots/<revision>/<file>`` to it; an LFS file's blob
  is named by the sha256 of its content (64 hex digits; huggingface_hub
  ``file_download.py``, ``_create_symlink`` and the ``X-Linked-Etag`` header). Weight
  files are LFS files. A small non-LFS file's blob is named by its git sha1 (40 digits):
  not a content sha256, so a snapshot holding one gets no exact fingerprint here.
- **A digest manifest** (``MANIFEST_NAME`` in the model directory) that
  ``netloader-digest MODEL_DIR`` writes once, for example when a model is published to
  shared storage: each weight file's size, modification time (ns) and sha256, and the
  files' sampled fingerprint. It is used only while fresh: every weight file listed,
  with the size and mtime it has now, and the sampled fingerprint unchanged (so a
  directory whose files were replaced under normalised mtimes, as reproducible builds
  set them, is not believed where the samples differ).

Both give, per file, (name, size, sha256), and the fingerprint is one blake3 over them
(``exact_fingerprint``): the same files give the same value from either source, and a
file whose content changed has another sha256 (a hub blob changes its name with its
content). What neither source can see: a file rewritten after ``netloader-digest``
ran with its size, mtime and every sampled byte unchanged (the manifest is then
believed), and a hub cache whose blob was modified under its name
(``huggingface-cli scan-cache`` does not check content either).

The identity carries this fingerprint beside the sampled one (``checkpoint_exact``),
compared where both sides have one: peers without it (older releases, other storage)
still compare the sampled one.
"""

import argparse
import contextlib
import hashlib
import json
import os
import re
import stat
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass

import blake3

MANIFEST_NAME = "netloader-digests.json"
MANIFEST_FORMAT = "netloader-digests-v1"
# A manifest is read whole: one of a model with thousands of files is far below this.
MAX_MANIFEST_BYTES = 4 << 20
_SHA256 = re.compile(r"[0-9a-f]{64}")
_READ_BYTES = 16 << 20


class ManifestError(Exception):
    """A digest manifest cannot be read, or is not one."""


@dataclass(frozen=True)
class FileDigest:
    """One weight file's exact identity: base name, size (bytes), sha256 (hex)."""

    name: str
    size: int
    sha256: str


@dataclass(frozen=True)
class ExactFingerprint:
    """A checkpoint fingerprint from whole-file hashes, and where they came from
    (``"hub cache"`` or the manifest's path)."""

    value: str
    source: str


def exact_fingerprint(files: Sequence[str], sampled: str) -> ExactFingerprint | str:
    """The exact fingerprint of ``files`` (a checkpoint's weight files, as
    ``identity.weight_files`` lists them, whose sampled fingerprint is ``sampled``), or
    why there is none (a reason for a log line) where neither source covers every file.
    Reads no weight file: only links, ``stat`` and the manifest."""
    if not files:
        return "no weight files"
    hub = _hub_digests(files)
    if hub is not None:
        return ExactFingerprint(_combine(hub), "hub cache")
    path = os.path.join(os.path.dirname(os.path.abspath(files[0])), MANIFEST_NAME)
    if not os.path.exists(path):
        return f"not a hub cache snapshot, and no {MANIFEST_NAME} (netloader-digest)"
    try:
        listed, written_over = read_manifest(path)
    except ManifestError as e:
        return f"{path} ignored: {e}"
    if written_over != sampled:
        return f"{path} is stale: the files' sampled fingerprint changed since it was written"
    out = []
    for f in files:
        name = os.path.basename(f)
        entry = listed.get(name)
        if entry is None:
            return f"{path} is stale: it does not list {name}"
        try:
            st = os.stat(f)
        except OSError as e:
            return f"cannot stat {f}: {e}"
        if (st.st_size, st.st_mtime_ns) != (entry[0], entry[1]):
            return f"{path} is stale: {name} changed since it was written (size or mtime)"
        out.append(FileDigest(name, entry[0], entry[2]))
    return ExactFingerprint(_combine(out), path)


def _combine(digests: Sequence[FileDigest]) -> str:
    h = blake3.blake3(b"netloader-checkpoint-exact-v1\0")
    for d in sorted(digests, key=lambda d: d.name):
        # os.fsencode: a file name that is not UTF-8 hashes as its bytes.
        h.update(os.fsencode(d.name) + f"\0{d.size}\0{d.sha256}\0".encode())
    return h.hexdigest()


def _hub_digests(files: Sequence[str]) -> list[FileDigest] | None:
    """Each file's sha256 from the blob it links to, if every one links to a blob
    named by a sha256 (a hub cache snapshot), else None."""
    out = []
    for f in files:
        if not os.path.islink(f):
            return None
        target = os.path.realpath(f)
        blob = os.path.basename(target)
        if os.path.basename(os.path.dirname(target)) != "blobs" or not _SHA256.fullmatch(blob):
            return None
        try:
            size = os.stat(target).st_size
        except OSError:
            return None
        out.append(FileDigest(os.path.basename(f), size, blob))
    return out


def read_manifest(path: str) -> tuple[dict[str, tuple[int, int, str]], str]:
    """The entries of the digest manifest at ``path`` (file name -> (size, mtime_ns,
    sha256)) and the sampled fingerprint it was written over. Raises ``ManifestError``
    naming what is wrong (not a regular file, too big, not JSON, another format, a
    malformed entry)."""
    try:
        # O_NONBLOCK: a FIFO under this name must not hold start-up.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as e:
        raise ManifestError(f"cannot read it: {e}") from e
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ManifestError("not a regular file")
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(MAX_MANIFEST_BYTES + 1)
    except OSError as e:
        raise ManifestError(f"cannot read it: {e}") from e
    finally:
        os.close(fd)
    if len(data) > MAX_MANIFEST_BYTES:
        raise ManifestError(f"over {MAX_MANIFEST_BYTES} bytes")
    try:
        raw = json.loads(data)
    except Exception as e:  # noqa: BLE001 - RecursionError, UnicodeDecodeError...: one bad file
        raise ManifestError(f"not JSON: {type(e).__name__}") from e
    if not isinstance(raw, dict) or raw.get("format") != MANIFEST_FORMAT:
        raise ManifestError(f"not a {MANIFEST_FORMAT} manifest")
    files, sampled = raw.get("files"), raw.get("sampled")
    if not isinstance(files, dict):
        raise ManifestError("no 'files' object")
    if not (isinstance(sampled, str) and _SHA256.fullmatch(sampled)):
        raise ManifestError("no 'sampled' fingerprint")
    out = {}
    for name, entry in files.items():
        if not isinstance(entry, dict):
            raise ManifestError(f"entry {name!r:.80} is not an object")
        size, mtime, digest = entry.get("size"), entry.get("mtime_ns"), entry.get("sha256")
        if not (type(size) is int and type(mtime) is int and size >= 0  # noqa: E721 - bool is no size
                and isinstance(digest, str) and _SHA256.fullmatch(digest)):
            raise ManifestError(f"entry {name!r:.80} is malformed")
        out[str(name)] = (size, mtime, digest)
    return out, sampled


def file_sha256(path: str) -> FileDigest:
    """Read ``path`` whole and return its (name, size, sha256) (hashlib, OpenSSL's
    sha256; the same hash the hub names LFS blobs by). Raises ``OSError``."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(_READ_BYTES):
            h.update(chunk)
            size += len(chunk)
    return FileDigest(os.path.basename(path), size, h.hexdigest())


def write_manifest(folder: str, files: Sequence[str], sampled: str) -> str:
    """Hash every one of ``files`` (in ``folder``; their sampled fingerprint is
    ``sampled``) and write ``folder``'s digest manifest atomically (a temporary file
    renamed over it); returns its path. The size and mtime are read before hashing and
    checked after: a file that changed meanwhile raises ``ManifestError``. Raises
    ``OSError`` where a file cannot be read or the manifest written."""
    entries = {}
    for path in files:
        before = os.stat(path)
        digest = file_sha256(path)
        after = os.stat(path)
        if (before.st_size, before.st_mtime_ns) != (after.st_size, after.st_mtime_ns):
            raise ManifestError(f"{path} changed while it was hashed")
        entries[digest.name] = {"size": after.st_size, "mtime_ns": after.st_mtime_ns,
                                "sha256": digest.sha256}
    target = os.path.join(folder, MANIFEST_NAME)
    fd, tmp = tempfile.mkstemp(prefix=f".{MANIFEST_NAME}.", dir=folder)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump({"format": MANIFEST_FORMAT, "sampled": sampled, "files": entries}, f,
                      indent=1, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return target


def main(argv: list[str] | None = None) -> int:
    """``netloader-digest MODEL_DIR``: write MODEL_DIR's digest manifest of the weight
    files vLLM would load from it, and print the exact checkpoint fingerprint."""
    from vllm_ascend.model_loader.netloader.identity import (
        CheckpointError,
        checkpoint_fingerprint,
        weight_files,
    )

    parser = argparse.ArgumentParser(
        prog="netloader-digest",
        description="Write a model directory's whole-file digests, for an exact "
                    "checkpoint fingerprint (Netloader).")
    parser.add_argument("model_dir", metavar="MODEL_DIR")
    args = parser.parse_args(argv)
    if not os.path.isdir(args.model_dir):
        parser.error(f"{args.model_dir} is not a directory")
    try:
        files = weight_files(args.model_dir)
        if not files:
            parser.error(f"{args.model_dir} holds no weight files vLLM would load")
        sampled = checkpoint_fingerprint(files)
        if _hub_digests(files) is not None:
            print(f"{args.model_dir} is a hub cache snapshot: its blob names are the "
                  "digests; nothing to write", file=sys.stderr)
        else:
            path = write_manifest(args.model_dir, files, sampled)
            print(f"wrote {path} ({len(files)} files)", file=sys.stderr)
    except (OSError, ManifestError, CheckpointError) as e:
        print(f"netloader-digest: {e}", file=sys.stderr)
        return 1
    exact = exact_fingerprint(files, sampled)
    if isinstance(exact, str):  # a file changed between the manifest and now
        print(f"netloader-digest: {exact}", file=sys.stderr)
        return 1
    print(exact.value)
    return 0


if __name__ == "__main__":
    sys.exit(main())
