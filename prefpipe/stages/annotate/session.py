"""Each annotator's queue over the session's pairs: what to show next, judgments, skips and undo.

- Everyone walks the same pairs in the same order, each with a queue of their own: the pairs they have
  neither judged nor skipped, then the pairs they skipped (in the order skipped), so judgments of several
  people meet on the same pairs early and agreement can be measured.
- A pair an annotator judged is never shown to them again (a second judgment of it is refused) unless they
  undo it: undo takes back their last judgment or skip, and that pair is shown next.
- Which image of a pair is on the left is drawn per (annotator, pair), the same after a restart, so a
  preference for one side of the screen does not become a preference for image 0.
- The state is a function of the journal: a restart replays it through the same :meth:`Session.apply` as
  the live events, so it resumes exactly where each annotator stopped.
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass, field

from prefpipe.core.errors import PrefpipeError
from prefpipe.stages.annotate.items import Item, SessionInput
from prefpipe.stages.annotate.journal import Journal

CHOICES = ("left", "right", "tie", "skip")


class UnknownPair(LookupError):
    """A pair id that is not one of the session's pairs."""


class Refused(ValueError):
    """A request that contradicts the annotator's state: a pair already judged, nothing to undo."""


def user_id_of(name: str) -> int:
    """An annotator's `user_id` (the pairs schema's int64): 48 bits of the SHA-256 of the name, the same in every
    session and work folder (and exact in a browser's numbers)."""
    return int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:6], "big")


def left_image(name: str, pair_id: str) -> int:
    """Which image of the pair (0 or 1) annotator `name` sees on the left."""
    return hashlib.sha256(f"{name}\0{pair_id}".encode()).digest()[0] & 1


@dataclass
class Judgment:
    seq: int
    at: str  # ISO 8601, UTC
    user: str
    pair_id: str
    label_0: float  # 1: image 0 preferred, 0: image 1, 0.5: a tie


@dataclass
class Annotator:
    name: str
    judged: dict[str, Judgment] = field(default_factory=dict)
    skipped: dict[str, None] = field(default_factory=dict)  # an ordered set
    actions: list[dict] = field(default_factory=list)  # live judge and skip events, the last one on top
    front: list[str] = field(default_factory=list)  # undone pairs, shown before the rest (the last undone first)
    cursor: int = 0  # every pair before it is judged or skipped

    @property
    def user_id(self) -> int:
        return user_id_of(self.name)

    def ties(self) -> int:
        return sum(j.label_0 == 0.5 for j in self.judged.values())


class Session:
    """The annotators' queues over `inp.items`, kept in step with the journal."""

    def __init__(self, inp: SessionInput, journal: Journal):
        self.input = inp
        self.items = inp.items
        self.position = {it.pair_id: i for i, it in enumerate(self.items)}
        self.journal = journal
        self.annotators: dict[str, Annotator] = {}
        self.lock = threading.RLock()
        for event in journal.read():
            try:
                self.apply(event)
            except (UnknownPair, Refused, KeyError) as e:
                raise PrefpipeError(f"{journal.path}: event {event.get('seq')} does not fit this session's pairs "
                                    f"({e}); the log belongs to other input") from None

    # -- the state ---------------------------------------------------------------------------------
    def apply(self, event: dict) -> None:
        """Advance the state by one journal event (live or replayed)."""
        a = self.annotator(event["user"])
        pair = event["pair"]
        if pair not in self.position:
            raise UnknownPair(pair)
        kind = event["event"]
        if kind == "judge":
            a.judged[pair] = Judgment(event["seq"], event["at"], a.name, pair, float(event["label_0"]))
            a.skipped.pop(pair, None)
            a.actions.append(event)
        elif kind == "skip":
            a.skipped.pop(pair, None)
            a.skipped[pair] = None  # to the end of the skipped ones
            a.actions.append(event)
        else:  # undo
            if not a.actions or a.actions[-1]["seq"] != event["undoes"]:
                raise Refused(f"undo of event {event['undoes']}, which is not {a.name}'s last")
            undone = a.actions.pop()
            if undone["event"] == "judge":
                a.judged.pop(pair, None)
            else:
                a.skipped.pop(pair, None)
            a.front.append(pair)
            a.cursor = min(a.cursor, self.position[pair])

    def annotator(self, name: str) -> Annotator:
        if name not in self.annotators:
            self.annotators[name] = Annotator(name)
        return self.annotators[name]

    def next_item(self, name: str) -> Item | None:
        """The pair to show annotator `name` now; None when they have judged every pair."""
        with self.lock:
            a = self.annotator(name)
            while a.front:
                pair = a.front[-1]
                if pair not in a.judged and pair not in a.skipped:
                    return self.input.by_id[pair]
                a.front.pop()
            while a.cursor < len(self.items) and (self.items[a.cursor].pair_id in a.judged
                                                  or self.items[a.cursor].pair_id in a.skipped):
                a.cursor += 1
            if a.cursor < len(self.items):
                return self.items[a.cursor]
            first_skipped = next(iter(a.skipped), None)
            return None if first_skipped is None else self.input.by_id[first_skipped]

    # -- requests ----------------------------------------------------------------------------------
    def judge(self, name: str, pair_id: str, choice: str) -> dict:
        """Record `choice` (left, right, tie or skip, as the annotator saw the pair) durably; the event written."""
        if choice not in CHOICES:
            raise Refused(f"choice {choice!r}: one of {', '.join(CHOICES)}")
        if pair_id not in self.position:
            raise UnknownPair(pair_id)
        with self.lock:
            a = self.annotator(name)
            if pair_id in a.judged:
                raise Refused(f"{name} has judged pair {pair_id} already (undo it to judge it again)")
            left = left_image(name, pair_id)
            if choice == "skip":
                event = self.journal.append(name, "skip", pair_id)
            else:
                label_0 = 0.5 if choice == "tie" else float((choice == "left") == (left == 0))
                event = self.journal.append(name, "judge", pair_id, label_0=label_0, left=left)
            self.apply(event)
            return event

    def undo(self, name: str) -> dict:
        """Take back annotator `name`'s last judgment or skip (durably); the undo event written."""
        with self.lock:
            a = self.annotator(name)
            if not a.actions:
                raise Refused(f"{name} has nothing to undo")
            last = a.actions[-1]
            event = self.journal.append(name, "undo", last["pair"], undoes=last["seq"])
            self.apply(event)
            return event

    # -- reading -----------------------------------------------------------------------------------
    def progress(self, name: str) -> dict:
        with self.lock:
            a = self.annotator(name)
            return {"judged": len(a.judged), "ties": a.ties(), "skipped": len(a.skipped), "total": len(self.items),
                    "remaining": len(self.items) - len(a.judged)}

    def judgments(self) -> list[Judgment]:
        """Every live judgment of every annotator, in the order they were made."""
        with self.lock:
            return sorted((j for a in self.annotators.values() for j in a.judged.values()), key=lambda j: j.seq)
