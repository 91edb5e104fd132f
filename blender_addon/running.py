"""Fit sessions running now, one per scene (light: the panel and operator polls read it)."""
_ACTIVE: dict = {}


def active_session(scene):
    """The FitSession running in ``scene``, or None."""
    return _ACTIVE.get(scene.as_pointer()) if scene is not None else None


def add(scene, session) -> None:
    _ACTIVE[scene.as_pointer()] = session


def remove(scene, session) -> None:
    if _ACTIVE.get(scene.as_pointer()) is session:
        del _ACTIVE[scene.as_pointer()]


def all_sessions() -> list:
    return list(_ACTIVE.values())
