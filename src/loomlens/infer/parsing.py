"""Parse a generation into boxes *and* the tokens each box came from.

In: a generation's token pieces and the image size. Out: `TokenBox`es (a box in pixels and the
indices of its label and loc tokens), so `infer/scoring.py` can score each box.

The text grammar is `loomlens.data.florence_text.parse_text`'s alone; this module only finds,
for each box that parser returns, its four `<loc_N>` tokens and its label tokens, so a score
can be read off the token log-probs. The alignment asks the parser itself: a box is complete
at its fourth loc token, so parsing the text up to each loc token tells which token closed
which box. No second grammar to drift from the first.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

from loomlens.data.florence_text import parse_text
from loomlens.data.records import Box

_LOC = re.compile(r"<loc_\d+>")


@dataclass
class TokenBox:
    """A parsed box (pixels, no score yet) with the indices, into the generation's tokens, of
    its label tokens (may be empty: a label given by the prompt) and its four loc tokens."""

    box: Box
    label_tokens: list[int]
    loc_tokens: list[int]


def token_pieces(tokenizer, token_ids: list[int]) -> list[str]:
    """The text each token contributes, so that `"".join(pieces)` is the decoded answer with
    special tokens kept as tags (`<s>`, `</s>`), which the parser ignores. An id the tokenizer
    does not know (a padded output row past its length) contributes `""`, so it is skipped.
    A character a byte-level tokenizer split over several tokens ("Ö" is two bytes) comes whole
    with the token that completes it; the tokens before contribute `""` (see `_ordinary_run`)."""
    special, added = _marker_ids(tokenizer)
    size = len(tokenizer)
    known = [tid if 0 <= tid < size else tokenizer.unk_token_id for tid in token_ids]
    tokens = tokenizer.convert_ids_to_tokens(known)
    pieces: list[str] = []
    run: list[str] = []  # ordinary tokens not yet turned into pieces
    for tid, tok in zip(token_ids, tokens, strict=True):
        if tok is not None and 0 <= tid < size and tid not in special and tid not in added:
            run.append(tok)
            continue
        pieces += _ordinary_run(tokenizer, run)
        run = []
        pieces.append("" if tok is None or not 0 <= tid < size
                      else tok if tid in special else tokenizer.convert_tokens_to_string([tok]))
    return pieces + _ordinary_run(tokenizer, run)


@functools.lru_cache(maxsize=8)
def _marker_ids(tokenizer) -> tuple[frozenset[int], frozenset[int]]:
    """The special ids and the added ones (`<loc_N>`, the task tokens) of `tokenizer`, read once
    per tokenizer: `get_added_vocab` rebuilds a dict of ~1000 tokens on every call."""
    return frozenset(tokenizer.all_special_ids), frozenset(tokenizer.get_added_vocab().values())


#: Tokens a split character may be held back over: a UTF-8 character is at most four bytes.
_MAX_HELD = 3


def _ordinary_run(tokenizer, tokens: list[str]) -> list[str]:
    """The pieces of a run of ordinary (not special) tokens, one per token: its own text, but
    a token ending inside a multi-byte character (its text ends in U+FFFD) gives `""` and the
    token that completes the character gives the held tokens' text with its own; bytes that
    never make a character stay U+FFFD, as `decode` writes them."""
    pieces: list[str] = []
    start = 0  # the first token held back
    for i in range(len(tokens)):
        text = tokenizer.convert_tokens_to_string(tokens[start : i + 1])
        if text.endswith("\ufffd") and i - start < _MAX_HELD and i + 1 < len(tokens):
            pieces.append("")
            continue
        pieces.append(text)
        start = i + 1
    return pieces


def _label_tokens(pieces: list[str], first_loc: int) -> list[int]:
    """Indices of the text tokens the parser read as the label of the box whose first loc
    token is `first_loc` (tags and bare whitespace excluded): the text before the run of loc
    tokens the box sits in, so boxes that share a label (`phrase<4 locs><4 locs>`) share its
    tokens even when a box before them in the run was dropped. Empty for a label given by the
    prompt."""
    found: list[int] = []
    i = first_loc - 1
    while i >= 0:
        piece = pieces[i]
        if _LOC.fullmatch(piece):
            if found:
                break  # the previous run: this label is complete
        elif piece.strip() and not (piece.startswith("<") and piece.endswith(">")):
            found.append(i)
        elif piece == "" and found and found[-1] == i + 1:
            found.append(i)  # the first bytes of a character the next token completes
        i -= 1
    return found[::-1]


def align_boxes(
    pieces: list[str], width: int, height: int, default_label: str | None = None
) -> tuple[list[TokenBox], int]:
    """Parse `pieces` (see `token_pieces`) as Florence-2 box text for a `width` x `height` image.

    Returns the boxes `parse_text` finds in `"".join(pieces)`, each with its token indices,
    and the parser's count of dropped (malformed, partial) parts. Never raises: a `None`
    piece (an id no tokenizer knows) counts as empty.
    """
    pieces = [p or "" for p in pieces]
    boxes, dropped = parse_text("".join(pieces), width, height, default_label)
    locs = [i for i, p in enumerate(pieces) if _LOC.fullmatch(p)]
    aligned: list[TokenBox] = []
    for n, end in enumerate(locs):
        if len(aligned) == len(boxes):
            break
        if n < 3:
            continue
        # The parser is incremental: the text up to a loc token holds one more box exactly
        # when that token closed one.
        count = len(parse_text("".join(pieces[: end + 1]), width, height, default_label)[0])
        if count > len(aligned):
            own = locs[n - 3 : n + 1]
            aligned.append(TokenBox(boxes[len(aligned)], _label_tokens(pieces, own[0]), own))
    return aligned, dropped
