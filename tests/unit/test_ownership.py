"""The stream-ownership table (orchd/core/ownership.py), driven event by event."""

from __future__ import annotations

import pytest

from orchd.core.ownership import (
    ENDED,
    FED,
    HELD,
    OPENABLE,
    TRANSITIONS,
    Ev,
    IllegalTransition,
    Stream,
    step,
)

S, E = Stream, Ev


def run(state: Stream, *events: Ev) -> Stream:
    for ev in events:
        state = step(state, ev)
    return state


def test_a_client_stream_of_a_queued_task() -> None:
    # GET while queued, dispatch attaches it, the ring gets the end, the frontend sends it.
    assert run(S.NONE, E.SUBSCRIBE) is S.SUBSCRIBED
    assert run(S.NONE, E.SUBSCRIBE, E.ATTACH) is S.ATTACHED
    assert run(S.NONE, E.SUBSCRIBE, E.ATTACH, E.TERMINAL) is S.TERMINAL_PENDING
    assert run(S.NONE, E.SUBSCRIBE, E.ATTACH, E.TERMINAL, E.SENT) is S.DONE


def test_the_cancel_handshake_fences_a_written_terminal() -> None:
    pending = run(S.NONE, E.SUBSCRIBE, E.ATTACH, E.TERMINAL)
    assert run(pending, E.FENCE) is S.FENCING
    assert run(pending, E.FENCE, E.SENT) is S.DONE


def test_a_provisional_stream_claimed_before_and_after_its_end() -> None:
    assert run(S.NONE, E.OPEN) is S.PROVISIONAL
    assert run(S.NONE, E.OPEN, E.ATTACH) is S.PROVISIONAL  # fed from dispatch on
    assert run(S.NONE, E.OPEN, E.CLAIM) is S.SUBSCRIBED
    assert run(S.NONE, E.OPEN, E.TERMINAL) is S.PROVISIONAL_ENDED
    assert run(S.NONE, E.OPEN, E.TERMINAL, E.CLAIM) is S.TERMINAL_PENDING


def test_a_provisional_stream_taken_over_or_let_go() -> None:
    assert run(S.NONE, E.OPEN, E.SUBSCRIBE) is S.SUBSCRIBED
    assert run(S.NONE, E.OPEN, E.TERMINAL, E.SUBSCRIBE) is S.SUBSCRIBED
    assert run(S.NONE, E.OPEN, E.DETACH) is S.NONE
    assert run(S.NONE, E.OPEN, E.TERMINAL, E.DETACH) is S.NONE


@pytest.mark.parametrize("state", [s for s in Stream if s not in (S.NONE, S.DETACHED)])
def test_a_frontends_death_takes_every_stream_it_held(state: Stream) -> None:
    # A live client stream is detached (its client may resume on another frontend); an
    # unclaimed or ended one is no longer streamed.
    live = state in (S.SUBSCRIBED, S.ATTACHED)
    assert step(state, E.LOST) is (S.DETACHED if live else S.NONE)


def test_a_client_that_leaves_mid_stream_detaches_it_for_a_grace_period() -> None:
    attached = run(S.NONE, E.SUBSCRIBE, E.ATTACH)
    assert run(attached, E.DROP) is S.DETACHED
    assert run(S.NONE, E.SUBSCRIBE, E.DROP) is S.DETACHED  # (its task still queued)
    assert run(attached, E.DROP, E.EXPIRE) is S.NONE  # no GET within the grace
    # A GET takes it back: with Last-Event-ID from the next event, without from the start.
    assert run(attached, E.DROP, E.RESUME, E.ATTACH) is S.ATTACHED
    assert run(attached, E.DROP, E.SUBSCRIBE, E.ATTACH) is S.ATTACHED


@pytest.mark.parametrize("state", list(Stream))
def test_a_resume_takes_the_stream_from_any_state(state: Stream) -> None:
    assert step(state, E.RESUME) is S.SUBSCRIBED


def test_a_second_get_without_last_event_id_is_refused_only_while_a_connection_holds_it() -> None:
    assert HELD.isdisjoint(OPENABLE)
    for state in HELD:
        assert (state, E.SUBSCRIBE) not in TRANSITIONS
    assert run(S.NONE, E.SUBSCRIBE, E.ATTACH, E.TERMINAL, E.SENT, E.SUBSCRIBE) is S.SUBSCRIBED


@pytest.mark.parametrize(
    ("state", "event"),
    [
        (S.NONE, E.TERMINAL),  # nobody streams it: nothing to write to
        (S.NONE, E.CLAIM),
        (S.ATTACHED, E.SUBSCRIBE),  # a second GET of a live stream
        (S.TERMINAL_PENDING, E.SUBSCRIBE),
        (S.FENCING, E.DROP),  # an ended stream is not detached: it has nothing more to feed
        (S.DETACHED, E.ATTACH),  # fed again only by a GET
        (S.DETACHED, E.LOST),  # no frontend holds it
        (S.ATTACHED, E.EXPIRE),
        (S.SUBSCRIBED, E.CLAIM),
        (S.ATTACHED, E.DETACH),  # only an unclaimed stream is let go
        (S.TERMINAL_PENDING, E.TERMINAL),  # one terminal per stream
        (S.FENCING, E.FENCE),
        (S.DONE, E.SENT),
        (S.NONE, E.LOST),
    ],
)
def test_illegal_transitions_raise(state: Stream, event: Ev) -> None:
    with pytest.raises(IllegalTransition, match=f"{state.value}: event {event.value}"):
        step(state, event)


def test_every_state_is_reachable_from_none() -> None:
    seen, todo = {S.NONE}, [S.NONE]
    while todo:
        here = todo.pop()
        for (src, _), dst in TRANSITIONS.items():
            if src is here and dst not in seen:
                seen.add(dst)
                todo.append(dst)
    assert seen == set(Stream)


def test_the_named_sets_agree_with_the_table() -> None:
    # A fed stream can end; an ended one can never be opened by a GET except when unclaimed.
    assert all((s, E.TERMINAL) in TRANSITIONS for s in FED)
    assert all((s, E.SUBSCRIBE) in TRANSITIONS for s in OPENABLE)
    assert not any((s, E.TERMINAL) in TRANSITIONS for s in ENDED)
    assert {S.PROVISIONAL_ENDED, S.DONE} == OPENABLE & ENDED
