"""The prefix tree (trie) of a row's answer options, and how its nodes are grouped for one forward.

Options often share their first tokens (label sets like ``card_arrival`` / ``card_linking``), so the
options of a row are stored once as a trie: node i holds ``tokens[i]``, its context is the prompt
plus its ancestors, and option k is the path ``paths[k]``. The log-probability of node i is read at
its parent's hidden state (the last prompt token for a first token), so

* only the *internal* nodes (those with a child) need a hidden state and must be fed to the model;
  a leaf -- the eos that closes each option -- is only predicted;
* the output layer runs once per distinct source state: the last prompt token and each internal node.

For the forward, internal nodes are grouped by the first-token subtree they belong to (a node must
sit in the same sequence as its ancestors) and the subtrees are packed first-fit-decreasing into
*bins* of at most ``max(width, largest subtree)`` nodes. A bin attends to the prompt and to itself,
so attention costs ``bin x (prompt + bin)`` per bin instead of ``trie x (prompt + trie)``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence


@dataclass
class Trie:
    """Prefix tree of a row's options. Node i holds ``tokens[i]``; ``parent[i]`` is -1 for a first
    token (its context is the prompt); parents come before children; ``paths[k]`` lists option k's nodes."""

    tokens: list[int]
    parent: list[int]
    depth: list[int]
    paths: list[list[int]]
    internal: list[int] = field(init=False)

    def __post_init__(self) -> None:
        has_child = set(p for p in self.parent if p >= 0)
        self.internal = [i for i in range(len(self.tokens)) if i in has_child]

    def root(self, node: int) -> int:
        """The first-token node whose subtree holds ``node``."""
        while self.parent[node] >= 0:
            node = self.parent[node]
        return node


def build_trie(options: Sequence[Sequence[int]]) -> Trie:
    tokens: list[int] = []
    parent: list[int] = []
    depth: list[int] = []
    index: dict[tuple[int, int], int] = {}
    paths = []
    for o in options:
        cur, path = -1, []
        for t in o:
            node = index.get((cur, t))
            if node is None:
                node = index[(cur, t)] = len(tokens)
                tokens.append(t)
                parent.append(cur)
                depth.append(0 if cur < 0 else depth[cur] + 1)
            path.append(node)
            cur = node
        paths.append(path)
    return Trie(tokens, parent, depth, paths)


def _first_fit(groups: list[list[int]], capacity: int) -> list[list[int]]:
    bins: list[list[int]] = []
    for g in groups:
        for b in bins:
            if len(b) + len(g) <= capacity:
                b.extend(g)
                break
        else:
            bins.append(list(g))
    return bins


def pack_subtrees(trie: Trie, width: int) -> list[list[int]]:
    """The internal nodes of ``trie`` in bins: each first-token subtree whole in one bin, packed
    first-fit decreasing. The capacity is the one in ``[w, 2w)``, ``w = max(width, largest subtree)``,
    that needs the fewest slots (bins x capacity: every bin is padded to the same width). Inside a
    bin the nodes keep the trie order (parents before children)."""
    if width < 1:
        raise ValueError(f"pack_subtrees needs width >= 1, got {width}")
    subtrees: dict[int, list[int]] = {}
    for node in trie.internal:
        subtrees.setdefault(trie.root(node), []).append(node)
    groups = sorted(subtrees.values(), key=len, reverse=True)          # stable: ties keep trie order
    if not groups:
        return []
    low = max(width, len(groups[0]))
    best = min(range(low, 2 * low), key=lambda cap: (len(_first_fit(groups, cap)) * cap, cap))
    return [sorted(b) for b in _first_fit(groups, best)]
