"""A default text corpus that exists on every machine: docstrings of the Python standard library.

The corpus needs no download and no data files. It is gathered deterministically:

* a fixed, sorted list of platform-neutral, pure-documentation-stable modules (nothing whose
  contents depend on the operating system, a C library version or the build, such as ``os``,
  ``socket``, ``ssl``, ``hashlib`` or ``zlib``);
* per module one document: the module docstring, then, in sorted name order, the docstrings of the
  public classes and functions defined by that module (or its ``_name`` C accelerator), and of the
  public methods and properties defined directly on each such class by that module (methods that
  other packages patch onto standard classes, as ``transformers`` does to ``logging.Logger``, are
  left out, so the corpus does not depend on what else was imported);
* every docstring is cleaned with :func:`inspect.cleandoc`, trailing whitespace is removed, prose
  paragraphs are joined into one line each (code, doctests, lists and indented blocks keep their
  lines), and exact
  duplicate docstrings are kept once.

The result is identical on every run and every machine with the same Python minor version. It is
English technical prose of roughly half a million characters (at least 200,000 is checked).
Docstrings are stripped under ``python -OO``; the corpus then refuses to build.
"""

from __future__ import annotations

import importlib
import inspect
import re
import warnings
from functools import lru_cache

from layerscope.errors import LayerscopeError

#: The modules whose documentation makes up the corpus, in the order of the documents.
MODULES: tuple[str, ...] = (
    "abc",
    "argparse",
    "base64",
    "bisect",
    "calendar",
    "collections",
    "configparser",
    "contextlib",
    "copy",
    "csv",
    "dataclasses",
    "datetime",
    "decimal",
    "difflib",
    "doctest",
    "email.message",
    "enum",
    "fractions",
    "functools",
    "gettext",
    "heapq",
    "html",
    "inspect",
    "ipaddress",
    "itertools",
    "json",
    "logging",
    "numbers",
    "operator",
    "pathlib",
    "pickle",
    "pprint",
    "queue",
    "random",
    "re",
    "sched",
    "statistics",
    "string",
    "struct",
    "tarfile",
    "textwrap",
    "threading",
    "timeit",
    "tokenize",
    "traceback",
    "types",
    "typing",
    "unittest",
    "urllib.parse",
    "uuid",
    "warnings",
    "weakref",
    "xml.etree.ElementTree",
    "zipfile",
)

MIN_CHARS = 200_000

_WS = re.compile(r"[ \t\f\v]+")
_KEEP_LINES = re.compile(r"\s|>>>|[-*+] |\d+[.)] |[A-Za-z_][\w.]* +-+ ")  # code, doctest, lists, option tables


def _normalise(doc: str) -> str:
    """Clean one docstring: prose paragraphs on one line, code blocks keep their lines."""
    lines = [line.rstrip() for line in inspect.cleandoc(doc).splitlines()]
    paragraphs: list[list[str]] = []
    current: list[str] = []
    for line in lines:
        if line.strip():
            current.append(line)
        elif current:
            paragraphs.append(current)
            current = []
    if current:
        paragraphs.append(current)
    out = []
    for para in paragraphs:
        is_code = any(_KEEP_LINES.match(line) for line in para)
        if is_code:
            out.append("\n".join(line.replace("\t", "    ") for line in para))
        else:
            out.append(" ".join(_WS.sub(" ", line.strip()) for line in para))
    return "\n\n".join(out)


def _own_doc(obj: object) -> str | None:
    """The docstring written on the object itself (not one inherited from a base class)."""
    if isinstance(obj, (staticmethod, classmethod)):
        obj = obj.__func__
    doc = getattr(obj, "__doc__", None)
    return doc if isinstance(doc, str) and doc.strip() else None


def _defined_here(obj: object, modname: str) -> bool:
    owner = getattr(obj, "__module__", None)
    if not isinstance(owner, str):
        return False
    return owner in (modname, "_" + modname) or owner.startswith(modname + ".")


def _member_defined_here(member: object, modname: str) -> bool:
    """False for a method some other package patched onto a standard class (transformers does)."""
    func = member.fget if isinstance(member, property) else getattr(member, "__func__", member)
    owner = getattr(func, "__module__", None)
    return owner is None or _defined_here(func, modname)  # C methods carry no __module__


def _module_document(modname: str, seen: set[str]) -> str:
    module = importlib.import_module(modname)
    docs: list[str] = []

    def add(doc: str | None) -> None:
        if doc is None:
            return
        text = _normalise(doc)
        if text and text not in seen:
            seen.add(text)
            docs.append(text)

    add(_own_doc(module))
    namespace = vars(module)  # not getattr: avoids module __getattr__ side effects and warnings
    for name in sorted(namespace):
        if name.startswith("_"):
            continue
        obj = namespace[name]
        if not (inspect.isclass(obj) or inspect.isroutine(obj)) or not _defined_here(obj, modname):
            continue
        add(_own_doc(obj))
        if inspect.isclass(obj):
            members = vars(obj)
            for attr in sorted(members):
                if attr.startswith("_"):
                    continue
                member = members[attr]
                if not (inspect.isroutine(member) or isinstance(member, (staticmethod, classmethod, property))):
                    continue
                if _member_defined_here(member, modname):
                    add(_own_doc(member))
    return "\n\n".join(docs)


@lru_cache(maxsize=1)
def _corpus() -> tuple[str, ...]:
    seen: set[str] = set()
    documents = []
    for modname in MODULES:
        try:
            with warnings.catch_warnings():  # e.g. typing.io warns when its __doc__ is read
                warnings.simplefilter("ignore")
                text = _module_document(modname, seen)
        except ImportError:  # a module missing from a stripped-down Python: skip, deterministically
            continue
        if text:
            documents.append(text)
    total = sum(len(d) for d in documents)
    if total < MIN_CHARS:
        raise LayerscopeError(
            f"the built-in corpus has only {total} characters (at least {MIN_CHARS} expected): "
            "docstrings are missing, probably because Python runs with -OO; run without -OO or "
            "give a text file as the corpus"
        )
    return tuple(documents)


def builtin_corpus() -> list[str]:
    """English docstrings of standard-library modules, one document per module (see module docs)."""
    return list(_corpus())
