"""Every error kissbot raises is a named subclass of KissbotError, so callers can tell them apart."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import kissbot
from kissbot.adopt import resolve_zone
from kissbot.errors import ConfigurationError


def test_the_base_error_is_never_raised_itself():
    package = Path(kissbot.__file__).parent
    bare = []
    for path in sorted(package.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call):
                func = node.exc.func
                if isinstance(func, ast.Name) and func.id == "KissbotError":
                    bare.append(f"{path.relative_to(package)}:{node.lineno}")
    assert bare == []


def test_an_unknown_time_zone_is_a_configuration_error():
    with pytest.raises(ConfigurationError, match=r"^unknown time zone 'Mars/Olympus': give an IANA name"):
        resolve_zone("Mars/Olympus")
