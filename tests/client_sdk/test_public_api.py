"""The SDK's public surface stays honest: `__all__` lists real, documented names, the
package ships type information, and every public method shows an example."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

import client_sdk

SDK_GUIDE = Path(__file__).resolve().parents[2] / "docs" / "sdk.md"
PUBLIC_CLASSES = ["PnsClient", "AsyncPnsClient", "DeviceClient", "AsyncDeviceClient", "KeyStore"]


def public_methods(cls: type) -> list[str]:
    """Public methods defined on `cls` or inherited from the SDK's private base classes."""
    names = set()
    for owner in cls.__mro__:
        if not owner.__module__.startswith("client_sdk"):
            continue
        for name, member in vars(owner).items():
            if name.startswith("_"):
                continue
            if isinstance(member, classmethod | staticmethod):
                member = member.__func__
            if inspect.isfunction(member):
                names.add(name)
    return sorted(names)


def test_all_is_sorted_and_unique() -> None:
    assert list(client_sdk.__all__) == sorted(set(client_sdk.__all__))


@pytest.mark.parametrize("name", client_sdk.__all__)
def test_every_exported_name_exists_and_is_documented(name: str) -> None:
    obj = getattr(client_sdk, name)  # AttributeError if __all__ lies
    if inspect.isclass(obj) or inspect.isfunction(obj):
        assert (inspect.getdoc(obj) or "").strip(), f"{name} has no docstring"
    guide = SDK_GUIDE.read_text()
    assert re.search(rf"(?<![\w.]){re.escape(name)}\b", guide), f"{name} is not in docs/sdk.md"


def test_nothing_public_is_left_out_of_all() -> None:
    exported = set(client_sdk.__all__)
    public = {
        name
        for name, obj in vars(client_sdk).items()
        if not name.startswith("_") and (inspect.isclass(obj) or inspect.isfunction(obj))
    }
    assert public <= exported, public - exported


def test_package_ships_py_typed() -> None:
    assert (Path(client_sdk.__file__).parent / "py.typed").is_file()


def example_cases() -> list[object]:
    return [
        pytest.param(c, m) for c in PUBLIC_CLASSES for m in public_methods(getattr(client_sdk, c))
    ]


@pytest.mark.parametrize(("cls_name", "method"), example_cases())
def test_every_public_method_has_an_example(cls_name: str, method: str) -> None:
    doc = inspect.getdoc(getattr(getattr(client_sdk, cls_name), method)) or ""
    assert ">>>" in doc or "Example" in doc, f"{cls_name}.{method} has no example"


@pytest.mark.parametrize(
    ("cls_name", "method"),
    [(c, m) for c in PUBLIC_CLASSES for m in public_methods(getattr(client_sdk, c))],
)
def test_every_public_method_is_in_the_guide(cls_name: str, method: str) -> None:
    assert re.search(rf"`[^`]*\b{method}\b", SDK_GUIDE.read_text()), f"{cls_name}.{method}"


TWINS = [("PnsClient", "AsyncPnsClient"), ("DeviceClient", "AsyncDeviceClient")]


def _prose(doc: str) -> list[str]:
    """The paragraphs of a docstring before its example, each on one line."""
    text = doc.split("Example")[0]
    return [" ".join(p.split()) for p in text.split("\n\n") if p.strip()]


@pytest.mark.parametrize(
    ("sync_name", "async_name", "method"),
    [
        (s, a, m)
        for s, a in TWINS
        for m in public_methods(getattr(client_sdk, a))
        if m in public_methods(getattr(client_sdk, s))
    ],
)
def test_async_twins_say_what_their_blocking_twins_say(
    sync_name: str, async_name: str, method: str
) -> None:
    # The blocking docstring is the complete one; the asyncio twin repeats its first
    # paragraph and points to it for the rest, so the two cannot drift apart.
    sync_doc = _prose(inspect.getdoc(getattr(getattr(client_sdk, sync_name), method)) or "")
    async_doc = _prose(inspect.getdoc(getattr(getattr(client_sdk, async_name), method)) or "")
    assert async_doc[0] == sync_doc[0], f"{async_name}.{method}"
    if len(sync_doc) > 1:
        assert f"`{sync_name}.{method}`" in " ".join(async_doc[1:]), f"{async_name}.{method}"
