"""Where a busy seed sends the next client (``RelayTree``): breadth first, at most
RELAY_FANOUT clients per relay, a chain at fan-out 1; a failed relay takes the relays
below it out; a bounded memory that keeps the newest relays."""

import pytest

from vllm_ascend.model_loader.netloader.seed.relay import RelayTree


def parents(tree: RelayTree, clients: list[str]) -> list[str | None]:
    """Each client in turn is sent to ``tree.parent()`` and then joins under it."""
    sent = []
    for client in clients:
        sent.append(tree.parent())
        tree.join(client, sent[-1])
    return sent


def test_fanout_one_is_the_chain():
    assert parents(RelayTree(1), ["a", "b", "c", "d"]) == [None, "a", "b", "c"]


def test_fanout_two_fills_breadth_first():
    # The seed serves two itself (the server decides that); its relays get two each.
    tree = RelayTree(2)
    for direct in ("a", "b"):
        tree.join(direct, None)
    assert parents(tree, ["c", "d", "e", "f", "g", "h", "i"]) == [
        "a", "a", "b", "b", "c", "c", "d"]


def test_a_dropped_relay_takes_the_relays_below_it_out():
    tree = RelayTree(2)
    tree.join("a", None)
    tree.join("x", None)
    assert parents(tree, ["b", "c", "y"]) == ["a", "a", "x"]
    tree.join("d", "b")  # below b, so below a
    tree.drop("a")
    assert len(tree) == 2  # x and y
    assert parents(tree, ["e", "f", "g"]) == ["x", "y", "y"]
    tree.drop("nobody")  # unknown: nothing to do
    assert len(tree) == 5


def test_a_client_is_never_sent_to_its_own_relay():
    # A second hello from a client whose relay already joined (or a peer naming that
    # port) would otherwise be redirected to itself.
    tree = RelayTree(2)
    tree.join("a", None)
    tree.join("b", None)
    assert tree.parent("a") == "b"
    assert tree.parent("a") == "b"  # b now full
    assert tree.parent("a") is None  # a still has room, but is the client's own
    assert tree.parent() == "a"


def test_a_drop_reaches_relays_below_a_forgotten_or_rejoined_relay():
    tree = RelayTree(1)
    tree.MAX_RELAYS = 3
    tree.join("a", None)
    tree.join("b", "a")
    tree.join("c", "b")
    tree.join("d", None)  # a is forgotten while b and c hang below it
    tree.drop("a")
    assert len(tree) == 1
    tree.drop("d")
    # A relay that joined again (after the one below it) is found as well.
    tree.join("x", None)
    tree.join("y", "z")  # z joins later
    tree.join("z", "x")
    tree.drop("x")
    assert len(tree) == 0


def test_a_known_relay_does_not_rejoin():
    tree = RelayTree(1)
    tree.join("a", None)
    assert tree.parent() == "a"
    tree.join("a", None)  # already known and full: stays full
    assert tree.parent() is None


def test_a_peer_offering_many_relay_ports_neither_grows_the_tree_nor_keeps_relays_out():
    tree = RelayTree(2)
    for port in range(RelayTree.MAX_RELAYS + 500):
        tree.join(f"10.0.0.1:{port}", None)
    assert len(tree) == RelayTree.MAX_RELAYS
    tree.join("honest:1", None)  # the oldest is forgotten, the newcomer kept
    assert len(tree) == RelayTree.MAX_RELAYS
    for _ in range(2 * (RelayTree.MAX_RELAYS - 1)):
        assert tree.parent() != "honest:1"
    assert tree.parent() == "honest:1"
    tree.clear()
    assert len(tree) == 0 and tree.parent() is None


def test_fanout_below_one_is_an_error():
    with pytest.raises(ValueError, match="fan-out"):
        RelayTree(0)
