"""The class grammar: constrained decoding for `<OD>`, so the model may only write well-formed
boxes of known classes.

In: a tokenizer, the class names, a box cap and a token budget. Out: a `LogitsProcessor` for
`model.generate`.

Grammar, per row: `<s>`, then boxes, each a class name (spelt as the tokenizer spells it) and
four `<loc_N>` with x2 >= x1 and y2 >= y1, then `</s>`. `</s>` is allowed only between boxes,
and forced when `max_boxes` are written or too few steps are left to finish another box, so
an answer is never cut mid-box. Every output then parses with nothing dropped, and class
names outside the training set cannot appear.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import LogitsProcessor

from loomlens.model.tokenizer import loc_token_ids


@dataclass(frozen=True)
class _State:
    """Where a row is in the grammar: `node` is the class-name trie node being spelt (None
    between boxes or inside the coordinates), `locs` the coordinates written so far for the
    current box, `boxes` the boxes finished, `done` after `</s>`."""

    started: bool = False
    node: int | None = None
    locs: tuple[int, ...] = ()
    boxes: int = 0
    done: bool = False


class BoxGrammar(LogitsProcessor):
    """A `LogitsProcessor` that masks every token the `<OD>` grammar forbids.

    `classes` are the class names allowed; `max_boxes` caps the answer; `max_new_tokens` is
    the generation budget (used to stop before a box that could not be finished).
    """

    def __init__(self, tokenizer, classes: Sequence[str], max_boxes: int, max_new_tokens: int):
        if not classes:
            raise ValueError("constrained decoding needs the class names (e.g. the run's classes.txt)")
        self.bos, self.eos, self.pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
        self.locs = loc_token_ids(tokenizer)
        self.loc_index = {tid: i for i, tid in enumerate(self.locs)}
        self.max_boxes = max_boxes
        self.max_new_tokens = max_new_tokens
        # A trie of class-name token sequences: node -> {token: child}, plus terminal nodes.
        self.children: list[dict[int, int]] = [{}]
        self.terminal: set[int] = set()
        longest = 0
        for name in classes:
            ids = tokenizer(name, add_special_tokens=False).input_ids
            longest = max(longest, len(ids))
            node = 0
            for tid in ids:
                node = self.children[node].setdefault(tid, len(self.children))
                if node == len(self.children):
                    self.children.append({})
            self.terminal.add(node)
        self.box_tokens = longest + 4
        self._states: dict[tuple[int, ...], _State] = {}
        self._masks: dict[tuple, torch.Tensor] = {}

    def _advance(self, state: _State, token: int) -> _State:
        """The state after `token`; a token the grammar forbids (only possible when a row was
        left unmasked, see `__call__`) ends the row."""
        if state.done or token == self.eos:
            return _State(started=True, boxes=state.boxes, done=True)
        if not state.started:
            return _State(started=True) if token == self.bos else _State(done=True)
        if token in self.loc_index and (state.locs or state.node in self.terminal):
            locs = state.locs + (self.loc_index[token],)
            if len(locs) == 4:
                return _State(started=True, boxes=state.boxes + 1)
            return _State(started=True, locs=locs, boxes=state.boxes)
        child = self.children[state.node or 0].get(token)
        if child is not None and not state.locs:
            return _State(started=True, node=child, boxes=state.boxes)
        return _State(started=True, boxes=state.boxes, done=True)

    def _state(self, prefix: tuple[int, ...]) -> _State:
        """The state after `prefix` (decoder-start excluded), memoised along the prefix."""
        if prefix not in self._states:
            parent = self._state(prefix[:-1]) if prefix else None
            self._states[prefix] = _State() if parent is None else self._advance(parent, prefix[-1])
        return self._states[prefix]

    def _choice(self, prefix: tuple[int, ...]) -> tuple:
        """What decides the tokens allowed after `prefix`: rows in the same place of the
        grammar share it, and with it one cached mask."""
        state = self._state(prefix)
        if state.done:
            return ("done",)
        if not state.started:
            return ("start",)
        if state.locs:
            return ("locs", state.locs[0] if len(state.locs) == 2 else state.locs[1] if len(state.locs) == 3 else 0)
        if state.node is not None:
            return ("name", state.node)
        room = self.max_new_tokens - len(prefix) - 1  # steps left after this one, `</s>` included
        return ("end",) if state.boxes >= self.max_boxes or room < self.box_tokens else ("between",)

    def _ids(self, choice: tuple) -> list[int]:
        kind = choice[0]
        if kind == "done":
            return [self.eos, self.pad]
        if kind == "start":
            return [self.bos]
        if kind == "locs":
            return self.locs[choice[1]:]
        if kind == "name":
            return list(self.children[choice[1]]) + (self.locs if choice[1] in self.terminal else [])
        return [self.eos] if kind == "end" else [self.eos, *self.children[0]]

    def allowed(self, prefix: tuple[int, ...]) -> list[int]:
        """Token ids the grammar allows after `prefix` (decoder-start excluded)."""
        return self._ids(self._choice(prefix))

    def _forbidden(self, choice: tuple, vocab: int, device) -> torch.Tensor:
        """A `(vocab,)` mask, True where `choice` forbids the token, built once per choice and
        cached: rebuilding it per row and step (a 1000-entry index each) costs about twice as
        much grammar time (docs/benchmarks.md)."""
        key = (choice, vocab, device)
        if key not in self._masks:
            mask = torch.ones(vocab, dtype=torch.bool, device=device)
            mask[self._ids(choice)] = False
            self._masks[key] = mask
        return self._masks[key]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        vocab = scores.shape[-1]
        mask = torch.stack([self._forbidden(self._choice(tuple(ids[1:])), vocab, scores.device)
                            for ids in input_ids.tolist()])
        masked = scores.masked_fill(mask, float("-inf"))
        # A row the grammar and another processor (e.g. forced `</s>`) leave with no token
        # keeps its own scores rather than producing NaNs.
        empty = torch.isinf(masked).all(dim=-1, keepdim=True)
        return torch.where(empty, scores, masked)
