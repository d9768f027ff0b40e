"""What each round costs on the wire: a Grid that counts the bytes of every message the
ServerApp sends to and receives from each hospital's node (``messages.payload_bytes``)."""

from __future__ import annotations

from collections import Counter

from fedtwin.server.messages import payload_bytes


class MeteredGrid:
    """The ServerApp's Grid, counting each node's traffic until ``take`` is called."""

    def __init__(self, grid):
        self.grid = grid
        self.down: Counter[int] = Counter()  # server -> node
        self.up: Counter[int] = Counter()  # node -> server

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        for msg in messages:
            self.down[int(msg.metadata.dst_node_id)] += payload_bytes(msg.content)
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        for reply in replies:
            if not reply.has_error():
                self.up[int(reply.metadata.src_node_id)] += payload_bytes(reply.content)
        return replies

    def take(self) -> dict:
        """Bytes per node since the last call, as a round's record keeps them."""
        nodes = sorted(set(self.down) | set(self.up))
        traffic = {
            "nodes": len(nodes),
            "to_node_bytes": {str(n): self.down[n] for n in nodes},
            "from_node_bytes": {str(n): self.up[n] for n in nodes},
        }
        self.down.clear()
        self.up.clear()
        return traffic

    def __getattr__(self, name):
        return getattr(self.grid, name)
