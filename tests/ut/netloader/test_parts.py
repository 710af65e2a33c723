"""Digests of large tensors in parts: what each part digest is, that the tensor digest
commits to every part, and that an accept's part digests are checked before use."""

import blake3
import pytest
import torch

from vllm_ascend.model_loader.netloader.manifest import (
    LoadedWeights,
    byte_view,
    digest,
    digest_parts,
)
from vllm_ascend.model_loader.netloader.parts import PART_BYTES, join_parts, part_count
from vllm_ascend.model_loader.netloader.wire import messages
from vllm_ascend.model_loader.netloader.wire.errors import ProtocolError

# 10 MiB of float32: parts of 4, 4 and 2 MiB.
BIG = (10 << 20) // 4


def big(seed: int = 0) -> torch.Tensor:
    return torch.randn(BIG, generator=torch.Generator().manual_seed(seed))


def test_a_large_tensors_parts_are_the_blake3_of_each_4_mib_piece():
    t = big()
    data = byte_view(t).numpy().tobytes()
    d, parts = digest_parts(t)
    assert part_count(t.nbytes) == len(parts) == 3
    assert parts == tuple(blake3.blake3(data[k : k + PART_BYTES]).hexdigest()
                          for k in range(0, len(data), PART_BYTES))
    assert d == digest(t) == join_parts(parts)
    # Not the plain blake3 of the bytes, nor of the part digests' bytes: keyed.
    assert d not in (blake3.blake3(data).hexdigest(),
                     blake3.blake3(b"".join(bytes.fromhex(p) for p in parts)).hexdigest())


def test_up_to_a_part_a_tensor_has_no_parts_and_its_plain_blake3():
    t = torch.ones(PART_BYTES // 4)
    assert digest_parts(t) == (blake3.blake3(byte_view(t).numpy().tobytes()).hexdigest(), ())
    assert part_count(PART_BYTES) == 0 and part_count(PART_BYTES + 1) == 2


@pytest.mark.parametrize("where", [0, PART_BYTES // 4 + 3, BIG - 1])
def test_a_change_in_any_part_changes_that_part_and_the_tensor_digest(where):
    a, b = big(), big()
    b[where] += 1
    (da, pa), (db, pb) = digest_parts(a), digest_parts(b)
    assert da != db
    changed = [k for k in range(3) if pa[k] != pb[k]]
    assert changed == [where * 4 // PART_BYTES]


def test_weights_refuse_part_digests_that_do_not_join_to_the_digest():
    t = big()
    d, parts = digest_parts(t)
    LoadedWeights([("w", t)], [d], parts={d: parts})
    swapped = (parts[1], parts[0], parts[2])
    for wrong in ({d: swapped}, {d: parts[:2]}, {}):
        with pytest.raises(ValueError, match="part digests"):
            LoadedWeights([("w", t)], [d], parts=wrong)


def accept_with(parts: str, counts=(0, 3, 0)) -> messages.Accept:
    digests = ["d" * 64, DIGEST, "e" * 64]
    msg = {**messages.accept(digests, 1 << 20, "tcp", None), "parts": parts}
    return messages.parse_accept(msg, 3, ("tcp",), 1 << 30, part_counts=list(counts))


DIGEST, PARTS = digest_parts(big())


def test_an_accepts_part_digests_are_read_for_the_tensors_that_have_parts():
    assert accept_with("".join(PARTS)).parts == {DIGEST: PARTS}
    msg = messages.accept(["d" * 64, DIGEST, "e" * 64], 1 << 20, "tcp", None, parts=PARTS)
    assert messages.parse_accept(msg, 3, ("tcp",), 1 << 30,
                                 part_counts=[0, 3, 0]).parts == {DIGEST: PARTS}


@pytest.mark.parametrize(
    "parts",
    ["".join(PARTS[:2]), "".join(PARTS) + "0" * 64, "".join(PARTS).upper(),
     "".join((PARTS[1], PARTS[0], PARTS[2])), "x" * 192, ""],
    ids=["one part short", "one part more", "not lowercase hex", "swapped", "not hex",
         "none"],
)
def test_an_accept_whose_part_digests_do_not_join_to_the_digest_is_refused(parts):
    with pytest.raises(ProtocolError, match="part digests"):
        accept_with(parts)
