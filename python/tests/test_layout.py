"""The struct layouts and prototypes of pagedvl._lib against the library and
the header: a drift between them must fail loudly at import, and the
declarations must cover the whole header."""
import ctypes as C
import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest

import pagedvl as pv
from pagedvl import _lib

HEADER = pathlib.Path(__file__).resolve().parents[2] / "include" / "pagedvl.h"


def header_text():
    # The tests live in the repository next to the header; a missing header
    # means the layout of the checkout changed, which must not pass silently.
    assert HEADER.is_file(), f"{HEADER} not found"
    text = HEADER.read_text()
    return re.sub(r"/\*.*?\*/", "", text, flags=re.S)


def test_declarations_match_the_loaded_library():
    assert _lib.layout_mismatches(_lib.lib) == []


def test_a_wrong_struct_is_detected(monkeypatch):
    class BadStats(C.Structure):  # tokens declared 32-bit instead of 64-bit
        _fields_ = [(n, C.c_uint32 if n == "tokens" else t)
                    for n, t in _lib.StatsStruct._fields_]

    monkeypatch.setitem(_lib.STRUCTS, "pvl_stats", BadStats)
    with pytest.raises(ImportError) as e:
        _lib.check_layouts(_lib.lib, _lib.path)
    msg = str(e.value)
    assert "pvl_stats: sizeof is 48 in the library, 40 in pagedvl._lib (BadStats)" in msg
    assert ("pvl_stats.tokens: size 8 at offset 24 in the library, size 4 at offset 20 "
            "in pagedvl._lib") in msg
    assert "pvl_stats.block_bytes: size 8 at offset 32 in the library, size 8 at offset 24" in msg
    assert "pvl_config" not in msg  # only what is wrong

    class MissingField(C.Structure):  # a field the library does not have
        _fields_ = _lib.SeqInfoStruct._fields_ + [("n_images", C.c_uint32)]

    monkeypatch.setitem(_lib.STRUCTS, "pvl_seq_info", MissingField)
    monkeypatch.setitem(_lib.SCALARS, "pvl_seq_id", C.c_uint32)
    bad = _lib.layout_mismatches(_lib.lib)
    assert any('pvl_seq_info.n_images: pvl_abi_layout: pvl_seq_info has no field "n_images"'
               in b for b in bad), bad
    assert "pvl_seq_id: sizeof is 8 in the library, 4 in pagedvl._lib" in bad


def test_import_fails_on_an_edited_declaration(tmp_path):
    """End to end: a copy of the package whose _lib.py declares a field of
    pvl_config with the wrong type does not import."""
    src = pathlib.Path(pv.__file__).parent
    dst = tmp_path / "pagedvl"
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    lib_py = dst / "_lib.py"
    text = lib_py.read_text()
    edited = text.replace('("num_blocks", C.c_uint32)', '("num_blocks", C.c_uint64)', 1)
    assert edited != text
    lib_py.write_text(edited)
    env = dict(os.environ, PAGEDVL_LIBRARY=os.path.abspath(_lib.path),
               PYTHONPATH=str(tmp_path))
    r = subprocess.run([sys.executable, "-c", "import pagedvl"], env=env,
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode != 0
    assert "ImportError: pagedvl: the struct declarations" in r.stderr
    assert "pvl_config.num_blocks: size 4 at offset" in r.stderr
    # ... and the unedited copy imports (so the failure above is the edit's).
    lib_py.write_text(text)
    r = subprocess.run([sys.executable, "-c", "import pagedvl; print(pagedvl.library_path)"],
                       env=env, capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == os.path.abspath(_lib.path)


def test_missing_library_is_a_clear_import_error(tmp_path):
    env = dict(os.environ, PAGEDVL_LIBRARY=str(tmp_path / "nope.so"))
    r = subprocess.run([sys.executable, "-c", "import pagedvl"], env=env,
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode != 0
    assert "libpagedvl.so not found in $PAGEDVL_LIBRARY" in r.stderr
    assert "nope.so (absent)" in r.stderr


def test_every_header_function_has_a_prototype():
    declared = set(re.findall(r"^PVL_API[^(]*?\b(pvl_[a-z0-9_]+)\s*\(", header_text(), re.M))
    assert len(declared) > 40
    assert declared == set(_lib.PROTOTYPES), (
        f"in the header only: {sorted(declared - set(_lib.PROTOTYPES))}; "
        f"in _lib only: {sorted(set(_lib.PROTOTYPES) - declared)}")


def header_structs():
    out = {}
    for name, body in re.findall(r"typedef struct (pvl_\w+) \{(.*?)\}\s*\1\s*;",
                                 header_text(), re.S):
        fields = []
        for decl in body.split(";"):
            decl = decl.strip()
            if not decl:
                continue
            fp = re.search(r"\(\s*\*\s*(\w+)\s*\)", decl)  # function pointer
            fields.append(fp.group(1) if fp else re.findall(r"\w+", decl)[-1])
        out[name] = fields
    return out


def test_every_header_struct_is_declared_with_its_fields_in_order():
    structs = header_structs()
    assert "pvl_config" in structs and "pvl_compress_report" in structs
    assert set(structs) == set(_lib.STRUCTS), sorted(set(structs) ^ set(_lib.STRUCTS))
    for name, fields in structs.items():
        assert [f for f, _ in _lib.STRUCTS[name]._fields_] == fields, name


def test_every_header_enum_matches():
    found = re.findall(r"typedef enum (pvl_\w+) \{(.*?)\}\s*\1\s*;", header_text(), re.S)
    assert len(found) >= 5
    assert {n for n, _ in found} == set(_lib.ENUMS)
    for name, body in found:
        values = {k: int(v) for k, v in re.findall(r"(PVL_\w+)\s*=\s*(\d+)", body)}
        cls, prefix = _lib.ENUMS[name]
        py = {prefix + m.name: m.value for m in cls}
        if name == "pvl_status":  # PVL_SUCCESS has no ERR_
            py["PVL_SUCCESS"] = py.pop("PVL_ERR_SUCCESS")
        assert values == py, name
