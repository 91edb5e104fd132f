"""What the operators that follow a backend job without blocking Blender share (Render with
Field: render_back.py; Re-mesh: results.py): a timer that ticks their session, and its end.
The operator keeps ``_timer`` and ``_session`` (an object with ``close()``)."""
from __future__ import annotations

TICK_SECONDS = 0.1


def start(op, context, text: str) -> set:
    """From ``invoke``, once ``op._session`` runs: tick it from the window's timer."""
    wm = context.window_manager
    op._timer = wm.event_timer_add(TICK_SECONDS, window=context.window)
    wm.modal_handler_add(op)
    op.report({"INFO"}, text)
    return {"RUNNING_MODAL"}


def stop(op, context) -> None:
    """At the session's end, or when Blender cancels the operator: no more ticks, session closed."""
    if op._timer is not None:
        context.window_manager.event_timer_remove(op._timer)
        op._timer = None
    if op._session is not None:
        op._session.close()
