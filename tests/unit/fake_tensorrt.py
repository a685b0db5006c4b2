"""A fake ``tensorrt`` module generated from the names a real binding wheel exports.

``FakeTensorRT("10.16.1.11")`` builds a module whose every class, method, property
and enum member is one listed in tests/data/trt_names/10.16.1.11.txt; anything else
raises AttributeError, exactly as the real module of that version would. Every name
the code touches is recorded (``fake.touched``), so a test can check the code's
declarations against what it really did.

Calls, assignments and enum values follow that wheel's real signatures
(tests/data/trt_signatures/, read by fake_signatures.py): a call no real overload
takes raises TypeError, assigning a read-only property or a method AttributeError,
and enum members carry the real numbers. Properties the code sets are logged in
``fake.assignments``.

Behind the names sits a small simulation of TensorRT (fake_trt_world.py: parser,
builder, runtime), just enough to drive the backend's paths without a GPU, so the
engine's buffers, copies and shapes are checked end to end. ``FakeCuda``
(fake_cuda.py) is the matching fake of ``cuda.bindings.runtime``.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.unit.fake_signatures import load_signatures, scalar_accepts
from tests.unit.fake_trt_world import BEHAVIOURS, CONSTRUCTORS, FakeWorld

NAMES_DIR = Path(__file__).resolve().parent.parent / "data" / "trt_names"
VERSION_LABELS = ("8.6.1", "10.16.1.11", "11.4.0.106")
LEAN_LABELS = ("lean-8.6.1", "lean-10.16.1.11", "lean-11.4.0.106")


def load_names(label: str) -> frozenset[str]:
    """The names of one data file (comment lines skipped)."""
    lines = (NAMES_DIR / f"{label}.txt").read_text().splitlines()
    return frozenset(line.strip() for line in lines if line.strip() and not line.startswith("#"))


def version_of(label: str) -> str:
    first = (NAMES_DIR / f"{label}.txt").read_text().splitlines()[0]
    return first.rsplit(" ", 1)[-1]


class EnumValue(int):
    """A pybind11 enum member: an int with a name."""

    def __new__(cls, owner: str, name: str, value: int) -> "EnumValue":
        member = super().__new__(cls, value)
        member.name = name  # type: ignore[attr-defined]
        member.owner = owner  # type: ignore[attr-defined]
        return member

    def __repr__(self) -> str:
        return f"<{self.owner}.{self.name}: {int(self)}>"  # type: ignore[attr-defined]

    __str__ = __repr__


class _FakeMeta(type):
    """Class-level attributes (enum members, nested classes) come from the name list."""

    _trt_name: str
    _trt_fake: "FakeTensorRT"

    def __getattr__(cls, attr: str) -> Any:
        if attr.startswith("_"):
            raise AttributeError(attr)
        return cls._trt_fake._class_attribute(cls._trt_name, attr)

    def __dir__(cls) -> list[str]:
        prefix = cls._trt_name + "."
        return sorted({n[len(prefix):].split(".")[0] for n in cls._trt_fake.names if n.startswith(prefix)})


class FakeObject(metaclass=_FakeMeta):
    """An instance of a fake TensorRT class: listed attributes only, called and set as the real ones allow."""

    _trt_name = "object"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        fake = type(self)._trt_fake
        object.__setattr__(self, "_state", {})
        bound = fake.bind(f"{type(self)._trt_name}.__init__", args, kwargs)
        hook = fake.constructors.get(type(self)._trt_name)
        if hook is not None:
            hook(fake, self, *bound)

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("_"):
            raise AttributeError(attr)
        return type(self)._trt_fake._instance_attribute(self, attr)

    def __setattr__(self, attr: str, value: Any) -> None:
        """Settable properties (int8_calibrator, ...) land in ``_state``; anything else fails as in pybind11."""
        cls = type(self)
        if attr.startswith("_"):
            object.__setattr__(self, attr, value)
            return
        owner = _listed_owner(cls, attr)
        # The backend's own subclasses (its ILogger) are Python classes with a __dict__.
        python_subclass = "_trt_name" not in cls.__dict__
        if owner is None:
            if python_subclass:
                object.__setattr__(self, attr, value)
                return
            raise AttributeError(f"'{cls._trt_name}' object has no attribute '{attr}'")
        fake = cls._trt_fake
        full = f"{owner}.{attr}"
        fake.touch(full)
        kind = fake.signatures.kind(full)
        if kind == "method":
            raise AttributeError(f"'{cls._trt_name}' object attribute '{attr}' is read-only")
        if kind == "read-only":
            raise AttributeError(f"property '{attr}' of '{cls._trt_name}' object has no setter")
        self._state[attr] = value
        fake.assignments.append((full, value))

    def __del__(self) -> None:
        fake = getattr(type(self), "_trt_fake", None)
        if fake is not None:
            fake.events.append(f"destroy {type(self)._trt_name}")


def _listed_owner(cls: type, attr: str) -> str | None:
    """The TensorRT class (this one or a fake base) whose list has ``attr``."""
    for klass in cls.__mro__:
        name = klass.__dict__.get("_trt_name")
        fake = getattr(klass, "_trt_fake", None)
        if name and fake is not None and f"{name}.{attr}" in fake.names:
            return str(name)
    return None


class FakeTensorRT(types.ModuleType):
    """One fake TensorRT module for one data file (a version, full or lean)."""

    def __init__(self, label: str, world: "FakeWorld | None" = None) -> None:
        self.lean = label.startswith("lean-")
        super().__init__("tensorrt_lean" if self.lean else "tensorrt")
        self.label = label
        self.names = load_names(label)
        self.signatures = load_signatures(label)
        self.touched: set[str] = set()
        self.assignments: list[tuple[str, Any]] = []  # (Class.property, value) the code set, in order
        self.events: list[str] = []
        self.world = world or FakeWorld()
        self.__version__ = version_of(label)
        self._classes: dict[str, type] = {}
        self.constructors: dict[str, Callable[..., None]] = dict(CONSTRUCTORS)
        self.behaviours: dict[str, Any] = dict(BEHAVIOURS)

    # --------------------------------------------------------------- name lookups

    def touch(self, name: str) -> None:
        self.touched.add(name)

    def __getattr__(self, attr: str) -> Any:  # module-level names
        if attr.startswith("_") and attr != "__version__":
            raise AttributeError(attr)
        if attr not in self.names:
            raise AttributeError(f"module '{self.__name__}' ({self.label}) has no attribute '{attr}'")
        self.touch(attr)
        if self._is_class(attr):
            return self._class(attr)
        behaviour = self.behaviours.get(attr)
        if behaviour is None:
            raise AttributeError(f"the fake has no behaviour for module function {attr}")
        return lambda *args, **kwargs: behaviour(self, *self.bind(attr, args, kwargs))

    def __dir__(self) -> list[str]:
        return sorted({n.split(".")[0] for n in self.names})

    def _is_class(self, dotted: str) -> bool:
        return any(n.startswith(dotted + ".") for n in self.names) or dotted[:1].isupper()

    def _class(self, dotted: str) -> type:
        if dotted not in self._classes:
            self._classes[dotted] = _FakeMeta(dotted.rsplit(".", 1)[-1], (FakeObject,), {"_trt_name": dotted, "_trt_fake": self})
        return self._classes[dotted]

    def _class_attribute(self, owner: str, attr: str, record: bool = True) -> Any:
        full = f"{owner}.{attr}"
        if full not in self.names:
            raise AttributeError(f"type object '{owner}' ({self.label}) has no attribute '{attr}'")
        if record:
            self.touch(full)
        if any(n.startswith(full + ".") for n in self.names):
            return self._class(full)
        if attr.isupper() or attr[:1].isupper():
            return EnumValue(owner, attr, self.signatures.enum_value(owner, attr))
        if self.signatures.kind(full) == "method":  # unbound: the instance comes first
            return lambda instance, *args, **kwargs: self._instance_attribute(instance, attr)(*args, **kwargs)
        return property()  # what a pybind11 property looks like on its class

    def _instance_attribute(self, instance: FakeObject, attr: str) -> Any:
        owner = _listed_owner(type(instance), attr)
        if owner is None:
            raise AttributeError(f"'{type(instance)._trt_name}' object ({self.label}) has no attribute '{attr}'")
        full = f"{owner}.{attr}"
        self.touch(full)
        kind = self.signatures.kind(full)
        behaviour = self.behaviours.get(full)
        if kind != "method":
            if behaviour is not None:
                return behaviour(self, instance)
            if attr in instance._state:
                return instance._state[attr]  # a property set earlier
            raise AttributeError(f"the fake has no behaviour for property {full}")
        return lambda *args, **kwargs: self._call(full, behaviour, instance, args, kwargs)

    def _call(self, full: str, behaviour: Any, instance: FakeObject, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        bound = self.bind(full, args, kwargs)  # first, as pybind11 does: a wrong call fails even where the fake has no behaviour
        if behaviour is None:
            raise NotImplementedError(f"the fake has no behaviour for {full}")
        return behaviour(self, instance, *bound)

    # --------------------------------------------------------------- calls as pybind11 checks them

    def bind(self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[Any]:
        """The arguments of a call to ``name`` in parameter order; TypeError when no real overload takes them."""
        return self.signatures.bind(name, args, kwargs, self._accepts)

    def _accepts(self, type_text: str, value: Any) -> bool:
        """pybind11's casters, where the fake can tell: ints, strs, this module's enums and classes."""
        scalar = scalar_accepts(type_text, value)
        if scalar is not None:
            return scalar
        name = type_text.replace("::", ".").rsplit(".", 1)[-1]
        if name in self.signatures.enums or type_text in self.signatures.enums:
            return isinstance(value, EnumValue) and value.owner in (name, type_text)  # type: ignore[attr-defined]
        if type_text in self._classes:
            return isinstance(value, self._classes[type_text])
        return True

    # --------------------------------------------------------------- helpers for behaviours

    def new(self, dotted: str, **state: Any) -> FakeObject:
        obj = self._class(dotted).__new__(self._class(dotted))
        object.__setattr__(obj, "_state", dict(state))
        return obj

    def member(self, dotted: str) -> EnumValue:
        """An enum member the simulation hands out (not a name the code touched)."""
        owner, _, attr = dotted.rpartition(".")
        value = self._class_attribute(owner, attr, record=False)
        assert isinstance(value, EnumValue)
        return value

    def log(self, logger: Any, severity: str, message: str) -> None:
        logger.log(self.member(f"ILogger.Severity.{severity}"), message)
