"""A client at one tensor-parallel size gathers its tensors over real sockets from the
seed ranks of an instance at another (vLLM's layer classes, filled by their own
``weight_loader``): disk-equal, each piece verified; refusals name the problem; a
hostile plan is refused and the seed keeps serving."""

import socket
import threading
from collections.abc import Iterator

import pytest
import torch

from tests.helpers.toy import IDENTITY, SMALL_BUCKET
from tests.ut.netloader.reshard.layers import loaded
from vllm_ascend.model_loader.netloader.manifest import LoadedWeights
from vllm_ascend.model_loader.netloader.reshard.fetch import (
    CrossLayoutError,
    GatherSettings,
    SeedRank,
    _Ask,
    _from_seed,
    _Links,
    gather,
    pieces_of,
)
from vllm_ascend.model_loader.netloader.reshard.gather import Box
from vllm_ascend.model_loader.netloader.reshard.shards import place_of
from vllm_ascend.model_loader.netloader.reshard.slices import Shard
from vllm_ascend.model_loader.netloader.seed import slicing
from vllm_ascend.model_loader.netloader.seed.server import SeedServer, SeedSettings
from vllm_ascend.model_loader.netloader.wire.addresses import listen

SECRET = b"s" * 32


def identity(size: int, rank: int, **more) -> dict:
    return {**IDENTITY, "tensor_parallel_size": size, "rank": rank, **more}


@pytest.fixture
def seeds(request) -> Iterator[list[SeedServer]]:
    """The ranks of a seed instance at tensor-parallel size ``request.param``, each
    serving its rank's loaded Block."""
    size = request.param
    servers = []
    for rank in range(size):
        settings = SeedSettings(identity(size, rank), rank, "127.0.0.1", 5.0,
                                bucket_bytes=SMALL_BUCKET, secret=SECRET)
        weights = LoadedWeights.capture(loaded(size, rank))
        servers.append(SeedServer(weights, settings, listen("127.0.0.1", 0)).start())
    try:
        yield servers
    finally:
        for server in servers:
            server.stop()


def ranks_of(servers: list[SeedServer]) -> list[SeedRank]:
    return [SeedRank(s.address, place_of(s.identity)) for s in servers]


def settings_for(size: int, rank: int, secret: bytes | None = SECRET) -> GatherSettings:
    return GatherSettings(identity(size, rank), secret, 5.0, 1e6)


def blank(size: int, rank: int) -> torch.nn.Module:
    client = loaded(size, rank)
    with torch.no_grad():
        for t in client.parameters():
            t.fill_(float("nan"))
    return client


@pytest.mark.parametrize("seeds, client_size", [(2, 1), (1, 2), (4, 2)], indirect=["seeds"])
def test_a_client_gathers_a_disk_equal_model_from_seed_ranks_of_another_size(seeds,
                                                                             client_size):
    for rank in range(client_size):
        client = blank(client_size, rank)
        got = gather(client, Shard(client_size, rank), ranks_of(seeds),
                     settings_for(client_size, rank))
        disk = loaded(client_size, rank)
        for (name, mine), theirs in zip(client.named_parameters(), disk.parameters(),
                                        strict=True):
            assert torch.equal(mine, theirs), name
        assert got.checkpoint == IDENTITY["checkpoint"]
        assert set(got.nbytes) <= {s.address for s in seeds}
    # Every rank that sent counts the client it served.
    assert all(s.describe()["completed_transfers"] >= 1 for s in seeds)


@pytest.mark.parametrize("seeds", [2], indirect=True)
def test_pieces_larger_than_the_limit_arrive_in_parts(seeds):
    client = blank(1, 0)
    small = GatherSettings(identity(1, 0), SECRET, 5.0, 1e6, piece_bytes=1024)
    gather(client, Shard(), ranks_of(seeds), small)
    for mine, theirs in zip(client.parameters(), loaded(1, 0).parameters(), strict=True):
        assert torch.equal(mine, theirs)


def test_a_box_is_cut_into_pieces_that_cover_it_once():
    lengths, itemsize, limit = (3, 5, 7), 4, 60  # one row of 7 is 28 bytes: 2 per piece
    seen = torch.zeros(lengths, dtype=torch.int32)
    for offsets, piece in pieces_of(lengths, itemsize, limit):
        assert torch.Size(piece).numel() * itemsize <= limit
        seen[tuple(slice(o, o + n) for o, n in zip(offsets, piece, strict=True))] += 1
    assert bool((seen == 1).all())


@pytest.mark.parametrize("seeds", [2], indirect=True)
def test_a_client_that_computed_another_place_for_a_rank_is_refused_by_name(seeds):
    wrong = [SeedRank(s.address, place_of(identity(2, 1 - r))) for r, s in enumerate(seeds)]
    client = blank(1, 0)
    with pytest.raises(CrossLayoutError, match="computed another place for this rank"):
        gather(client, Shard(), wrong, settings_for(1, 0))


@pytest.mark.parametrize("seeds", [2], indirect=True)
def test_another_model_or_no_secret_is_refused(seeds):
    other = GatherSettings({**identity(1, 0), "config_sha256": "1" * 64}, SECRET, 5.0, 1e6)
    with pytest.raises(CrossLayoutError, match="model identity differs: config_sha256"):
        gather(blank(1, 0), Shard(), ranks_of(seeds), other)
    with pytest.raises(CrossLayoutError, match="requires the shared secret"):
        gather(blank(1, 0), Shard(), ranks_of(seeds), settings_for(1, 0, secret=None))


@pytest.mark.parametrize("box, why", [
    (Box((0, 0), (99, 32)), "a box outside qkv.weight"),
    (Box((0,), (1,)), "a box outside qkv.weight"),
])
@pytest.mark.parametrize("seeds", [2], indirect=True)
def test_a_hostile_plan_is_refused_and_the_seed_keeps_serving(seeds, box, why):
    target = {"qkv.weight": torch.zeros(99, 32)}
    with pytest.raises(CrossLayoutError, match=why):
        _from_seed(ranks_of(seeds)[0], [_Ask("qkv.weight", box, box)], target,
                   settings_for(1, 0), _Links(), torch.nn.Module())
    with pytest.raises(CrossLayoutError, match="holds no loaded tensor"):
        _from_seed(ranks_of(seeds)[0], [_Ask("nothing", box, box)],
                   {"nothing": torch.zeros(99, 32)}, settings_for(1, 0), _Links(),
                   torch.nn.Module())
    client = blank(1, 0)
    gather(client, Shard(), ranks_of(seeds), settings_for(1, 0))
    assert not any(bool(t.isnan().any()) for t in client.parameters())


@pytest.mark.parametrize("seeds", [2], indirect=True)
def test_a_piece_whose_bytes_do_not_match_its_digest_is_never_written(seeds, monkeypatch):
    """A seed (or a path) that sends other bytes than it announced: the piece fails its
    digest in the staging buffer and the client's tensor keeps what it held."""
    real = slicing._digests

    def lying(weights, index, pieces, deadline):  # o.bias's piece announced wrong
        found = real(weights, index, pieces, deadline)
        for k, (i, _) in enumerate(index):
            if weights.specs[i].name == "o.bias":
                found[k] = "0" * 64
        return found

    monkeypatch.setattr(slicing, "_digests", lying)
    client = blank(1, 0)
    with pytest.raises(CrossLayoutError, match="digest mismatch for a piece of o.bias"):
        gather(client, Shard(), ranks_of(seeds), settings_for(1, 0))
    assert bool(client.o.bias.isnan().all())


@pytest.mark.parametrize("seeds", [2], indirect=True)
def test_a_seed_rank_that_dies_mid_gather_fails_the_gather(seeds):
    """Rank 1 accepts the connection and closes it: the gather names that rank."""
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))
    dead.listen()
    address = f"127.0.0.1:{dead.getsockname()[1]}"

    def close_each() -> None:
        conn, _ = dead.accept()
        conn.close()

    closer = threading.Thread(target=close_each, daemon=True)
    closer.start()
    try:
        ranks = ranks_of(seeds)
        ranks[1] = SeedRank(address, ranks[1].place)
        with pytest.raises(CrossLayoutError, match=f"seed rank {address}"):
            gather(blank(1, 0), Shard(), ranks, settings_for(1, 0))
    finally:
        dead.close()
        closer.join(5)


def ask_of(seeds: list[SeedServer], asks: list[_Ask], target: dict) -> None:
    _from_seed(ranks_of(seeds)[0], asks, target, settings_for(1, 0), _Links(),
               torch.nn.Module())


@pytest.mark.parametrize("seeds", [2], indirect=True)
def test_a_plan_asking_a_piece_twice_or_too_many_pieces_is_refused(seeds):
    """Repeating pieces (or asking thousands of one-element ones) would make the seed
    hash and copy far more than a client needs."""
    box = Box((0, 0), (1, 32))
    target = {"qkv.weight": torch.zeros(24, 32)}
    with pytest.raises(CrossLayoutError, match="asked twice"):
        ask_of(seeds, [_Ask("qkv.weight", box, box)] * 2, target)
    many = [_Ask("qkv.weight", Box((r % 24, c), (1, 1)), Box((r % 24, c), (1, 1)))
            for r in range(24) for c in range(32)]
    with pytest.raises(CrossLayoutError, match="pieces asked of a rank of 11 tensors"):
        ask_of(seeds, many, target)


@pytest.mark.parametrize("seeds", [2], indirect=True)
def test_a_seed_whose_tensor_changed_since_it_loaded_refuses_by_name(seeds):
    """Digests of pieces are taken from the tensors as they are now: the seed first
    checks the bytes it sends from against the digests taken at the load."""
    with torch.no_grad():
        seeds[1].layouts.loaded.tensors[1].mul_(2)  # qkv.weight of rank 1, in place
    with pytest.raises(CrossLayoutError, match=r"qkv\.weight changed since it was loaded"):
        gather(blank(1, 0), Shard(), ranks_of(seeds), settings_for(1, 0))


def test_a_relay_still_receiving_serves_no_client_in_another_layout():
    from vllm_ascend.model_loader.netloader.seed.relay import RelayProgress

    weights = LoadedWeights.capture(loaded(1, 0))
    progress = RelayProgress([s.nbytes for s in weights.specs])
    settings = SeedSettings(identity(1, 0), 0, "127.0.0.1", 5.0, secret=SECRET)
    relay = SeedServer(weights, settings, listen("127.0.0.1", 0), progress=progress).start()
    try:
        with pytest.raises(CrossLayoutError, match="relay still receiving"):
            gather(blank(2, 0), Shard(2, 0), [SeedRank(relay.address, place_of(
                identity(1, 0)))], settings_for(2, 0))
    finally:
        relay.stop()


def test_a_client_without_a_checkpoint_to_compare_asks_no_seed():
    settings = GatherSettings({**identity(1, 0), "checkpoint": None}, SECRET, 5.0, 1e6)
    with pytest.raises(CrossLayoutError, match="no checkpoint fingerprint to compare"):
        gather(blank(1, 0), Shard(), [SeedRank("127.0.0.1:9", place_of(identity(2, 0)))],
               settings)


@pytest.mark.parametrize("seeds, client_size", [(2, 1), (1, 2)], indirect=["seeds"])
def test_on_one_core_pieces_land_in_place_or_staged_and_each_is_verified(seeds, client_size):
    """A vLLM CPU worker's receiving thread has one core: each piece is read on it,
    straight into the client's tensor where its box is one run of it (a TP=1 client's
    column-parallel rows), else into one staging buffer (its row-parallel columns)."""
    from tests.ut.netloader.test_cores import on_one_cpu

    for rank in range(client_size):
        client = blank(client_size, rank)
        on_one_cpu(lambda c=client, r=rank: gather(c, Shard(client_size, r),
                                                   ranks_of(seeds),
                                                   settings_for(client_size, r)))
        for mine, theirs in zip(client.parameters(), loaded(client_size, rank).parameters(),
                                strict=True):
            assert torch.equal(mine, theirs)


@pytest.mark.parametrize("seeds", [2], indirect=True)
def test_on_one_core_a_piece_that_fails_its_digest_fails_the_gather(seeds, monkeypatch):
    from tests.ut.netloader.test_cores import on_one_cpu

    real = slicing._digests

    def lying(weights, index, pieces, deadline):  # the row-parallel o.weight's pieces
        found = real(weights, index, pieces, deadline)
        return ["0" * 64 if weights.specs[i].name == "o.weight" else d
                for d, (i, _) in zip(found, index, strict=True)]

    monkeypatch.setattr(slicing, "_digests", lying)
    failed: list[Exception] = []

    def run() -> None:
        try:
            gather(blank(1, 0), Shard(), ranks_of(seeds), settings_for(1, 0))
        except CrossLayoutError as e:
            failed.append(e)

    on_one_cpu(run)
    assert failed and "digest mismatch for a piece of o.weight" in str(failed[0])
