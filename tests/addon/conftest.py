"""Fixtures of the add-on's tests.

* ``addon`` (module scope): the development add-on (fit_implicit.blender_addon) registered in
  this process's Blender for the module's tests, unregistered after them.
"""
import pytest


@pytest.fixture(scope="module")
def addon():
    from fit_implicit import blender_addon
    blender_addon.register()
    yield blender_addon
    blender_addon.unregister()
