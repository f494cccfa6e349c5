"""Whether this checkout is installed and up to date for the Python that runs this file: the
check that lets ``scripts/setup.sh`` skip ``pip install -e ".[test]"`` (and its C++ build).

    python scripts/install_state.py check   # one line on stdout; exit 0: up to date, 1: not
    python scripts/install_state.py stamp   # after a successful install: record what was installed

Up to date means all of:

- ``nlmerge`` imports from this checkout (an editable install, not another copy), even in a
  directory that holds a folder named ``nlmerge`` (the clone, seen from its parent: an install
  whose import hook comes after the current directory gets an empty namespace package there);
- the stamp (``build/setup-stamp.json``, git-ignored) was written by the same Python executable;
- every file the install depends on has the SHA-256 recorded in the stamp: ``pyproject.toml``
  (dependencies and extras), ``setup.py`` and every file under ``csrc/`` (the C++ extension);
  a file added or removed counts as a change;
- the extension file recorded in the stamp (if the build made one) is still there.

Runs without torch or nlmerge importable (a fresh machine is simply not up to date).
"""
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STAMP = Path("build") / "setup-stamp.json"
INPUTS = ("pyproject.toml", "setup.py")
SOURCE_DIRS = ("csrc",)


def install_inputs(root):
    """``{relative path: sha256 hex}`` of every file the install depends on (see the module doc)."""
    root = Path(root)
    paths = [root / name for name in INPUTS if (root / name).is_file()]
    for folder in SOURCE_DIRS:
        paths += [p for p in (root / folder).rglob("*") if p.is_file()]
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(paths)}


def extension_files(root):
    """The built C++ extension files (``nlmerge/_C*.so``/``.pyd``) under ``root``, relative, sorted."""
    root = Path(root)
    return sorted(p.relative_to(root).as_posix() for p in (root / "nlmerge").glob("_C*") if p.suffix in (".so", ".pyd"))


def installed_from(root, python=sys.executable):
    """Whether ``python`` imports ``nlmerge`` from ``root``, run in a fresh process from a temporary
    directory that holds an empty ``nlmerge`` folder (as the clone's parent does)."""
    code = "import importlib.util as u; s = u.find_spec('nlmerge'); print(s.origin if s else '')"
    with tempfile.TemporaryDirectory() as cwd:
        os.mkdir(os.path.join(cwd, "nlmerge"))
        found = subprocess.run([python, "-c", code], cwd=cwd, capture_output=True, text=True)
    origin = found.stdout.strip()
    expected = Path(root).resolve() / "nlmerge" / "__init__.py"
    return found.returncode == 0 and bool(origin) and Path(origin).resolve() == expected


def stamp_state(root, stamp=STAMP, python=sys.executable):
    """``(matches, reason)``: whether the stamp under ``root`` records ``python`` and the current
    install inputs, with a one-line reason naming what differs."""
    path = Path(root) / stamp
    try:
        recorded = json.loads(path.read_text())
        inputs, recorded_python, extensions = recorded["inputs"], recorded["python"], recorded["extensions"]
    except (OSError, ValueError, KeyError, TypeError):
        return False, f"no valid install stamp at {stamp}"
    if recorded_python != python:
        return False, f"last installed for another Python ({recorded_python})"
    current = install_inputs(root)
    changed = sorted(name for name in current.keys() | inputs.keys() if current.get(name) != inputs.get(name))
    if changed:
        shown = ", ".join(changed[:3]) + (f" and {len(changed) - 3} more" if len(changed) > 3 else "")
        return False, f"{shown} changed since the last install"
    missing = [name for name in extensions if not (Path(root) / name).exists()]
    if missing:
        return False, f"the built extension {missing[0]} is gone"
    return True, "installed from this checkout and up to date"


def check(root=ROOT, stamp=STAMP, python=sys.executable):
    """``(up_to_date, reason)`` for ``root`` and ``python`` (all the conditions of the module doc)."""
    if not installed_from(root, python):
        return False, "nlmerge is not installed from this checkout"
    return stamp_state(root, stamp, python)


def write_stamp(root=ROOT, stamp=STAMP, python=sys.executable):
    """Record the current install inputs, ``python`` and the built extension files (replaces the
    stamp at once)."""
    path = Path(root) / stamp
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"python": python, "inputs": install_inputs(root), "extensions": extension_files(root)},
                              indent=1))
    os.replace(tmp, path)


def main(argv):
    if argv == ["check"]:
        ok, reason = check()
        print(reason)
        return 0 if ok else 1
    if argv == ["stamp"]:
        write_stamp()
        return 0
    print("usage: install_state.py check|stamp", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
