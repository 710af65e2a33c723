"""Where a busy seed sends the next client (``RelayTree``): breadth first, at most
RELAY_FANOUT clients per relay, a chain at fan-out 1."""

import pytest

from vllm_ascend.model_loader.netloader.seed.relay import RelayTree


def parents(tree: RelayTree, clients: list[str]) -> list[str | None]:
    """Each client in turn is sent to ``tree.parent()`` and then joins."""
    sent = []
    for client in clients:
        sent.append(tree.parent())
        tree.join(client)
    return sent


def test_fanout_one_is_the_chain():
    assert parents(RelayTree(1), ["a", "b", "c", "d"]) == [None, "a", "b", "c"]


def test_fanout_two_fills_breadth_first():
    # The seed serves two itself (the server decides that); its relays get two each.
    tree = RelayTree(2)
    for direct in ("a", "b"):
        tree.join(direct)
    assert parents(tree, ["c", "d", "e", "f", "g", "h", "i"]) == [
        "a", "a", "b", "b", "c", "c", "d"]


def test_a_dropped_relay_gets_no_more_clients_and_a_known_one_does_not_rejoin():
    tree = RelayTree(1)
    tree.join("a")
    tree.join("b")
    tree.drop("a")
    assert tree.parent() == "b"
    tree.join("b")  # already known: keeps its count
    assert tree.parent() is None
    tree.drop("nobody")  # unknown: nothing to do
    assert len(tree) == 1


def test_a_peer_offering_many_relay_ports_cannot_grow_the_tree_without_bound():
    tree = RelayTree(1)
    for port in range(RelayTree.MAX_RELAYS + 500):
        tree.join(f"10.0.0.1:{port}")
    assert len(tree) == RelayTree.MAX_RELAYS
    tree.clear()
    assert len(tree) == 0 and tree.parent() is None


def test_fanout_below_one_is_an_error():
    with pytest.raises(ValueError, match="fan-out"):
        RelayTree(0)
