"""Compile, load and pin the capture programs (and the inbound enforcement program,
bpf/mn_inbound.c, whose failure to load costs only itself) with bcc; and show the exact C and
flags the compiler gets (`meshnode bpf source`).

bcc is imported inside `load_and_pin` only: this module runs in the short-lived loader process
(meshnode.bpf.loader), never in the agent, whose memory must not carry LLVM (~130 MB).
Constants reach the C code as -D flags from constants.bpf_defines() plus MN_PIN_DIR; the
source text is never edited.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from meshnode import constants
from meshnode.bpf import inbound, syscall
from meshnode.bpf.program import DNS_MAP_PINS, MAP_PINS, EntrySpec, ProgramSpec, all_programs
from meshnode.build import ENV as BUILD_ENV
from meshnode.errors import BpfError, UsageError

_SAFE_PIN_DIR = re.compile(r"^/[A-Za-z0-9._/-]+$")


def check_pin_dir(pin_dir: Path) -> str:
    """The pin dir as it goes into a C string literal: absolute, no quotes or spaces."""
    text = str(pin_dir)
    if not _SAFE_PIN_DIR.match(text) or ".." in pin_dir.parts:
        raise UsageError(f"unusable BPF pin directory {text!r}",
                         "use an absolute path on bpffs of letters, digits and ._-/")
    return text


@dataclass(frozen=True, slots=True)
class BuildConfig:
    """What one agent instance compiles in: where maps are pinned, and the two constants an
    instance may override (agents side by side use their own port and mark)."""

    pin_dir: Path = Path(constants.PIN_ROOT) / constants.DEFAULT_INSTANCE
    outbound_port: int = constants.OUTBOUND_PORT
    proxy_mark: int = constants.PROXY_MARK
    # Programs are pinned as prog_<function>-<tag> (bpffs refuses dots): a new build loads
    # next to the running one (maps are shared by their pins) and the agent swaps the
    # attachments atomically.
    tag: str = ""

    def pin_name(self, entry: EntrySpec) -> str:
        return f"{entry.pin_name}-{self.tag}" if self.tag else entry.pin_name

    def defines(self) -> dict[str, int]:
        return {**constants.bpf_defines(), "MN_OUTBOUND_PORT": self.outbound_port,
                "MN_PROXY_MARK": self.proxy_mark}


def cflags(config: BuildConfig, include_dir: Path) -> list[str]:
    """The flags handed to clang: include path, every constant, the pin dir."""
    pin_dir = config.pin_dir
    flags = [f"-I{include_dir}"]
    flags += [f"-D{name}={value}" for name, value in sorted(config.defines().items())]
    flags.append(f'-DMN_PIN_DIR="{check_pin_dir(pin_dir)}"')
    return flags


@contextmanager
def _sources() -> Iterator[Path]:
    """The bpf/ source directory as a real path (bcc needs files for #include)."""
    with resources.as_file(resources.files("meshnode.bpf_src")) as root:
        yield Path(root)


def render_source(config: BuildConfig | None = None) -> str:
    """Every C file exactly as compiled, each preceded by the flags it is compiled with
    (`meshnode bpf source`)."""
    out: list[str] = []
    with _sources() as root:
        flags = cflags(config or BuildConfig(), root / "include")
        out.append("/* ==== include/mn_maps.h ==== */\n")
        out.append((root / "include" / "mn_maps.h").read_text())
        for prog in (*all_programs(), inbound.PROGRAM):
            out.append(f"\n/* ==== {prog.source} ==== */\n")
            out.append(f"/* clang {' '.join(flags)} */\n")
            out.append((root / prog.source).read_text())
    return "".join(out)


def program_build(config: BuildConfig) -> str:
    """A digest of what the kernel runs: every C file as compiled and its flags (and
    MESHNODE_BUILD_ID, with which a test stages an upgrade). Reads files only: no bcc."""
    digest = hashlib.sha256(render_source(config).encode())
    digest.update(os.environ.get(BUILD_ENV, "").encode())
    return digest.hexdigest()[:12]


@dataclass(frozen=True, slots=True)
class LoadedEntry:
    function: str
    pin: str
    prog_id: int


@dataclass(frozen=True, slots=True)
class Loaded:
    entries: list[LoadedEntry]
    # Map name -> (key size, value size) as clang laid out the C types (bcc's Key and Leaf):
    # what the layout test compares with the Python struct formats.
    layouts: dict[str, tuple[int, int]]
    # The sk_lookup program (inbound enforcement), or why the kernel would not take it.
    inbound: LoadedEntry | None = None
    inbound_error: str = ""


def load_and_pin(config: BuildConfig) -> Loaded:
    """Compile every program, load its entries, pin maps (by mn_maps.h) and programs under
    `config.pin_dir`. The pins keep everything alive after this process exits."""
    pin_dir = config.pin_dir
    try:
        from bcc import BPF  # a foreign module: imported here only (see module docstring)
    except ImportError as exc:
        raise BpfError(f"bcc is not importable: {exc}",
                       "install python3-bpfcc and use a venv made with "
                       "--system-site-packages") from exc
    loaded: list[LoadedEntry] = []
    layouts: dict[str, tuple[int, int]] = {}
    with _sources() as root, ExitStack() as modules:
        flags = cflags(config, root / "include")
        for prog in all_programs():
            bpf = _compile(BPF, root / prog.source, flags, prog)
            modules.callback(bpf.cleanup)
            layouts.update(_layouts(bpf, (*MAP_PINS, *DNS_MAP_PINS)))
            for entry in prog.entries:
                try:
                    fn = bpf.load_func(entry.function, int(entry.prog_type),
                                       attach_type=int(entry.attach_type))
                except Exception as exc:  # bcc raises bare Exception
                    raise BpfError(f"the kernel rejected {entry.function}: {exc}",
                                   "run `meshnode bpf source` and check the verifier log "
                                   "(rerun the loader with MESHNODE_BPF_DEBUG=1)") from exc
                path = str(pin_dir / config.pin_name(entry))
                syscall.obj_pin(fn.fd, path)
                loaded.append(LoadedEntry(entry.function, path,
                                          syscall.prog_info(fn.fd).id))
    missing = [m for m in (*MAP_PINS, *DNS_MAP_PINS) if not (pin_dir / m).exists()]
    if missing:
        raise BpfError(f"maps not pinned: {', '.join(missing)}",
                       "check that bpffs is mounted at /sys/fs/bpf")
    try:
        linked, inbound_layouts = _load_inbound(BPF, config)
    except BpfError as exc:  # the capture stands; inbound enforcement falls back to iptables
        return Loaded(loaded, layouts, None, exc.message.splitlines()[0])
    return Loaded(loaded, {**layouts, **inbound_layouts}, linked)


def _load_inbound(bpf_cls: Any, config: BuildConfig) -> tuple[LoadedEntry,
                                                                 dict[str, tuple[int, int]]]:
    """Compile and load mn_inbound.c (sk_lookup), pin its maps and program."""
    entry = inbound.ENTRY
    with _sources() as root, ExitStack() as modules:
        bpf = _compile(bpf_cls, root / inbound.PROGRAM.source,
                       cflags(config, root / "include"), inbound.PROGRAM)
        modules.callback(bpf.cleanup)
        layouts = _layouts(bpf, inbound.MAP_PINS)
        try:
            # bcc 0.26 has no BPF.SK_LOOKUP: the type and expected attach type by number
            fn = bpf.load_func(entry.function, int(entry.prog_type),
                               attach_type=int(entry.attach_type))
        except Exception as exc:  # bcc raises bare Exception
            raise BpfError(f"the kernel rejected {entry.function} (sk_lookup): "
                           f"{str(exc).splitlines()[0] if str(exc) else exc!r}") from exc
        path = str(config.pin_dir / config.pin_name(entry))
        syscall.obj_pin(fn.fd, path)
        return LoadedEntry(entry.function, path, syscall.prog_info(fn.fd).id), layouts


def _layouts(bpf: Any, names: tuple[str, ...]) -> dict[str, tuple[int, int]]:
    """Key and value sizes of the maps a compiled module defines (bcc's ctypes types)."""
    import ctypes

    out: dict[str, tuple[int, int]] = {}
    for name in names:
        try:
            table = bpf.get_table(name.encode())
        except KeyError:  # not defined by this module (mn_dns.c's maps in the others)
            continue
        # A per-CPU table's Leaf is an array of one value per CPU; sLeaf is the C type.
        leaf = getattr(table, "sLeaf", table.Leaf)
        out[name] = (ctypes.sizeof(table.Key), ctypes.sizeof(leaf))
    return out


def _compile(bpf_cls: Any, source: Path, flags: list[str], prog: ProgramSpec) -> Any:
    debug = 0x2 if os.environ.get("MESHNODE_BPF_DEBUG") else 0  # DEBUG_BPF: verifier log
    try:
        bpf = bpf_cls(src_file=str(source).encode(), cflags=flags, debug=debug)
    except Exception as exc:  # bcc raises bare Exception on compile errors
        raise BpfError(f"compiling {prog.source} failed: {exc}",
                       "check kernel headers at /lib/modules/$(uname -r)/build "
                       "(see `meshnode bpf source`)") from exc
    return bpf
