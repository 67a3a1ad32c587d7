"""Who streams a task: one state machine, as a table, shared by the three processes that
each hold a view of it (the scheduler's :class:`~orchd.core.tasks.Task`, the supervisor's
run, the frontend's stream). Each applies the events it learns of; an illegal one raises.

States::

    NONE               no frontend streams the task (yet, or any more)
    PROVISIONAL        the admitting frontend holds a stream nobody has claimed; it is fed
                       from the start, and the supervisor keeps the transcript for a replay
    PROVISIONAL_ENDED  ... and that unclaimed stream already holds its terminal frame
    SUBSCRIBED         a client's stream; nothing feeds it yet (its task is queued)
    ATTACHED           the supervisor feeds the stream's ring (live, or replaying)
    TERMINAL_PENDING   the terminal frame is written (ring or frontend), maybe not yet sent
    FENCING            a fence is out: the frontend answers once the terminal is on the wire
    DONE               the terminal frame is on the client's socket
    DETACHED           its client's connection (or its frontend) went away mid-stream;
                       nothing is fed, the transcript is kept, and the scheduler cancels the
                       task unless a GET takes the stream back within
                       ``limits.resume_grace_ms``

Events: ``open`` (a provisional stream at admission), ``claim`` (its client came),
``subscribe`` (a GET: a new stream, maybe taking over a provisional one elsewhere),
``attach`` (the supervisor feeds it), ``terminal`` (its terminal frame is written),
``fence`` (the scheduler asks to be told when it is sent), ``sent`` (it is sent),
``detach`` (an unclaimed stream let go), ``lost`` (its frontend died), ``drop`` (its client
left before the terminal), ``resume`` (a GET with ``Last-Event-ID``: it takes the stream
from whoever holds it, and is fed from the event after that id), ``expire`` (the grace
after a drop passed with no GET).

The cancel handshake. A cancel is answered only once no further ``token`` can reach the
client: the stream's terminal frame is on its socket (or there is no socket)::

    client      frontend            scheduler              supervisor        engine
      │ POST cancel │                    │                       │               │
      │────────────▶│ Cancel(req) ──────▶│ queued: ends it,      │               │
      │             │                    │ frontend writes end:  │               │
      │             │◀── StreamEnd(fence)│ (TERMINAL → FENCING)  │               │
      │             │                    │                       │               │
      │             │                    │ running: Abort ──────▶│ EngAbort ────▶│
      │             │                    │                       │ end frame into│
      │             │                    │                       │ the ring, then│
      │             │                    │◀─ TaskEnded, AbortDone│               │
      │             │                    │ (ATTACHED → TERMINAL_PENDING)         │
      │             │◀──────── Fence ────│ (TERMINAL_PENDING → FENCING)          │
      │◀─ end ──────│ drains the ring, writes the terminal to the socket         │
      │             │ FenceDone ────────▶│ (FENCING → DONE)      │               │
      │◀── 204 ─────│◀──────── Done(req) │                       │               │

A task nobody streams, or whose stream is unclaimed (``NONE``, ``PROVISIONAL_ENDED``), has no
socket to fence: its cancels are answered as soon as the task has ended.
"""

from __future__ import annotations

from enum import Enum
from typing import Final


class Stream(Enum):
    NONE = "none"
    PROVISIONAL = "provisional"
    PROVISIONAL_ENDED = "provisional_ended"
    SUBSCRIBED = "subscribed"
    ATTACHED = "attached"
    TERMINAL_PENDING = "terminal_pending"
    FENCING = "fencing"
    DONE = "done"
    DETACHED = "detached"


class Ev(Enum):
    OPEN = "open"
    CLAIM = "claim"
    SUBSCRIBE = "subscribe"
    ATTACH = "attach"
    TERMINAL = "terminal"
    FENCE = "fence"
    SENT = "sent"
    DETACH = "detach"
    LOST = "lost"
    DROP = "drop"
    RESUME = "resume"
    EXPIRE = "expire"


class IllegalTransition(Exception):
    """An event a stream in its state cannot take: a bug in whoever sent it."""

    def __init__(self, state: Stream, event: Ev) -> None:
        super().__init__(f"stream {state.value}: event {event.value} is not allowed")
        self.state = state
        self.event = event


S, E = Stream, Ev

TRANSITIONS: Final[dict[tuple[Stream, Ev], Stream]] = {
    (S.NONE, E.OPEN): S.PROVISIONAL,
    (S.NONE, E.SUBSCRIBE): S.SUBSCRIBED,
    (S.PROVISIONAL, E.CLAIM): S.SUBSCRIBED,
    (S.PROVISIONAL, E.SUBSCRIBE): S.SUBSCRIBED,  # taken over by another frontend
    (S.PROVISIONAL, E.ATTACH): S.PROVISIONAL,  # fed from dispatch on
    (S.PROVISIONAL, E.TERMINAL): S.PROVISIONAL_ENDED,
    (S.PROVISIONAL, E.DETACH): S.NONE,
    (S.PROVISIONAL_ENDED, E.CLAIM): S.TERMINAL_PENDING,
    (S.PROVISIONAL_ENDED, E.SUBSCRIBE): S.SUBSCRIBED,
    (S.PROVISIONAL_ENDED, E.DETACH): S.NONE,
    (S.SUBSCRIBED, E.ATTACH): S.ATTACHED,
    (S.SUBSCRIBED, E.TERMINAL): S.TERMINAL_PENDING,
    (S.ATTACHED, E.TERMINAL): S.TERMINAL_PENDING,
    (S.TERMINAL_PENDING, E.FENCE): S.FENCING,
    (S.TERMINAL_PENDING, E.SENT): S.DONE,
    (S.FENCING, E.SENT): S.DONE,
    # A client gone mid-stream: the task runs on for a grace period, a GET may take it back.
    (S.SUBSCRIBED, E.DROP): S.DETACHED,
    (S.ATTACHED, E.DROP): S.DETACHED,
    (S.DETACHED, E.SUBSCRIBE): S.SUBSCRIBED,  # replayed from the start
    (S.DETACHED, E.EXPIRE): S.NONE,
    (S.DONE, E.SUBSCRIBE): S.SUBSCRIBED,  # read again, whole, while the transcript is kept
}
# A frontend's death takes every stream it held; a live one is detached (its client may
# come back on another frontend), an unclaimed or ended one is simply no longer streamed.
for _s in Stream:
    if _s not in (S.NONE, S.DETACHED):
        TRANSITIONS[(_s, E.LOST)] = S.NONE
TRANSITIONS[(S.SUBSCRIBED, E.LOST)] = S.DETACHED
TRANSITIONS[(S.ATTACHED, E.LOST)] = S.DETACHED
# A GET with Last-Event-ID takes the stream whatever holds it (the old connection ends).
for _s in Stream:
    TRANSITIONS[(_s, E.RESUME)] = S.SUBSCRIBED

# States in which a stream is fed from the producer's ring (the supervisor writes to it).
FED: Final = frozenset({S.PROVISIONAL, S.ATTACHED})
# States in which no client's connection holds the stream (it is unclaimed, or nobody's).
UNCLAIMED: Final = frozenset({S.NONE, S.PROVISIONAL, S.PROVISIONAL_ENDED})
# States in which a GET without Last-Event-ID may open the stream (anything else: a live
# connection holds it, 409).
OPENABLE: Final = UNCLAIMED | {S.DETACHED, S.DONE}
# States in which a client's connection holds the stream (a take-over ends that connection).
HELD: Final = frozenset({S.SUBSCRIBED, S.ATTACHED, S.TERMINAL_PENDING, S.FENCING})
# States in which the terminal frame is written into the stream.
ENDED: Final = frozenset({S.PROVISIONAL_ENDED, S.TERMINAL_PENDING, S.FENCING, S.DONE})


def step(state: Stream, event: Ev) -> Stream:
    """The state after ``event``; raises :class:`IllegalTransition` if there is none."""
    try:
        return TRANSITIONS[(state, event)]
    except KeyError:
        raise IllegalTransition(state, event) from None
