"""Settings by name: every leaf field of a dataclass config tree has one name, unique across the
tree, used unchanged on the panel, the wire, the command line (``--set NAME=VALUE``) and in
presets.  :class:`NamedSettings` gives a config class that view (fitting/config.py FitConfig,
fitting/image_fit.py ImageFitConfig).
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Any


class NamedSettings:
    """Mixin for dataclass configs whose leaves are reached by name (module doc)."""

    def owner(self) -> str:
        """What the settings belong to, for error messages."""
        return type(self).__name__

    def settings(self) -> dict[str, tuple[Any, Any]]:
        """Every setting's name -> (the config object holding it, its current value)."""
        out: dict[str, tuple[Any, Any]] = {}

        def walk(obj) -> None:
            for f in dataclasses.fields(obj):
                value = getattr(obj, f.name)
                if dataclasses.is_dataclass(value):
                    walk(value)
                elif f.name in out:     # guarded by a test: names are unique
                    raise AssertionError(f"setting {f.name!r} is defined twice")
                else:
                    out[f.name] = (obj, value)

        walk(self)
        return out

    def set(self, **values) -> "NamedSettings":
        """Set settings by name (see the module doc); raises ValueError naming unknown ones."""
        known = self.settings()
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ValueError(f"unknown setting(s) {', '.join(unknown)} for {self.owner()}")
        for name, value in values.items():
            setattr(known[name][0], name, value)
        return self

    def parse(self, pairs: list[str]) -> dict[str, Any]:
        """``["NAME=VALUE", ...]`` (the command line's ``--set``) -> settings by name, each value
        typed like the setting's current value.  Raises ValueError naming a bad pair."""
        known, out = self.settings(), {}
        for pair in pairs:
            name, sep, text = pair.partition("=")
            if not sep or name not in known:
                raise ValueError(f"--set {pair!r}: expected NAME=VALUE with NAME one of {', '.join(sorted(known))}")
            kind = type(known[name][1])
            try:
                if kind is bool:
                    word = text.strip().lower()
                    if word not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
                        raise ValueError
                    out[name] = word in ("1", "true", "yes", "on")
                elif kind is int:
                    out[name] = int(float(text))
                else:
                    out[name] = kind(text)
            except ValueError:
                words = " (true/false, yes/no, on/off, 1/0)" if kind is bool else ""
                raise ValueError(f"--set {pair!r}: {text!r} is not a valid {kind.__name__}{words}") from None
        return out

    def replace(self, **values) -> "NamedSettings":
        """A copy with the named settings changed."""
        return copy.deepcopy(self).set(**values)

    def flat(self) -> dict[str, Any]:
        """Every setting by name, one level deep."""
        return {name: value for name, (_, value) in self.settings().items()}
