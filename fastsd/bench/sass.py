"""``python -m fastsd.bench.sass``: what the compiled code of every Triton kernel costs, without a GPU.

Every ``AOT_SPECS`` entry of every ``fastsd.kernels`` module (the variants the launchers pick, with
the alignment the JIT specialises on) is compiled for sm_90 and read with the NVIDIA tools that
ship inside the triton wheel (``triton/backends/nvidia/bin``): ``cuobjdump --dump-resource-usage``
for registers and stack, ``nvdisasm`` for the SASS. Per spec the report gives:

* ``regs``, ``spill`` (local-memory instructions LDL/STL plus stack bytes), ``smem`` (Triton's
  dynamic shared memory) and ``occ``: the H100 occupancy those allow (registers allocated per warp
  in units of 256 out of 65536 a SM, 2048 threads, 228 KB of shared memory with 1 KB reserved a
  CTA, at most 32 CTAs a SM);
* ``ld`` / ``st``: the global loads and stores on the element path (below) by width in bits, and
  ``w128``: the share of the bytes they name that 128-bit accesses (``LDG.E.128``) move;
* integer divisions: ``div``, the ``div``/``rem`` instructions of 32-bit integers in the PTX (each
  one a ~20-instruction sequence in SASS, ``I2F.U32.RP`` + ``MUFU.RCP`` + fix-ups); ``div64``, the
  64-bit ones (PTX ``div``/``rem`` ``.s64``/``.u64``: a fast 32-bit path plus a call of
  ``__internal_*_div_s64`` in SASS); ``ediv``, those of them in the per-element path, read from the
  TTIR (a division whose result is a tensor, or any division inside a loop, by a divisor that is
  not a constant: a constant divisor becomes a multiply-high);
* ``mul64``: 64-bit multiplies in the PTX (``mul.lo``/``mad.lo`` ``.s64``, each three ``IMAD``\\s)
  and ``wide``: ``IMAD.WIDE``/``IMAD.HI`` on the element path (32 x 32 -> 64-bit products);
* ``bar``: barriers on the element path;
* ``instr``, ``bytes``, ``issue``: the issue model below.

The issue model
---------------
An H100 SXM moves 3.35 TB/s while its 132 SMs x 4 schedulers x ~1.98 GHz issue one warp instruction
each a cycle: 32 threads x 16 bytes = 512 bytes take 512 / 3.35e12 s, in which the schedulers issue
~160 instructions. So a thread has ~160 issue slots per 16 bytes it moves before a memory-bound
kernel turns instruction-bound; ``issue`` = ``instr`` / (160 x ``bytes`` / 16), and a memory-bound
kernel should stay well below 100 % (the budget in tests/test_sass.py is 50 %: other warps' memory
latency, address generation and tails eat the rest).

How the per-thread instruction stream is counted (static, from the SASS control-flow graph):

* A kernel without loops: the longest path from the entry to an exit, every instruction on it
  counted once (predicated-off instructions issue too; early exits and cold branches, e.g. the
  64-bit division's slow path, are not the longest path). Subroutines are not entered (a ``CALL`` is
  one instruction; a call of a division routine shows in ``div64``), nor blocks that call
  ``__assertfail`` (a failing device assert) or trap.
* A kernel with loops that access global memory: the innermost such loop whose iteration has the
  largest ``issue`` share, counted as its longest path from the loop header back to it (one
  iteration); the prologue and epilogue are amortised over the iterations and left out. ``path``
  says which (``loop@<address>``); loops without global accesses count once.
* ``bytes``: what the global accesses on that path move, each at its width. A spec may declare
  ``"moved_bytes"``, the bytes a thread really moves on that path, where the static sum overstates it
  (masked loads of which only one is taken, e.g. patch swap reads each element from the sample or
  from its partner, never both, but issues both loads); the traffic tests check such a figure.

Under ``TRITON_INTERPRET=1`` the kernels cannot be compiled in this process, so :func:`report` runs
``python -m fastsd.bench.sass --json -`` in a subprocess without it. Results are cached per process,
and the disassembly of a cubin on disk (``$FASTSD_CACHE_DIR``, default ``~/.cache/fastsd``, under
``sass/``; triton's own cache makes recompiling cheap). nvdisasm spends ~0.5 s starting up, whatever
it reads, then ~2 s a MiB of code: so the report compiles every spec first, and the code sections of
all the kernels not in that cache go through raw-mode nvdisasm together (``-b SM90a``, up to 2 MiB a
run: the whole report's 3.4 MiB in two runs, in parallel), whose text is split per kernel and
rewritten as ``nvdisasm -c`` prints one cubin (:func:`disassemble_many`): ~10 s for every spec, where
an ``nvdisasm -c`` run a cubin took ~200 s of CPU.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import hashlib
import importlib
import json
import math
import os
import pkgutil
import re
import struct
import subprocess
import sys
import tempfile
import zlib
from typing import Dict, Iterable, List, Optional

ARCH = 90
# Bump when the cached disassembly (text) changes form or the parsing below reads something else from it.
_CACHE_VERSION = 2


@dataclasses.dataclass(frozen=True)
class Machine:
    """The H100 SXM figures of the issue model and of the occupancy calculation."""

    name: str = "H100 SXM (sm_90)"
    bandwidth: float = 3.35e12  # bytes/s of HBM3
    sms: int = 132
    schedulers: int = 4  # warp schedulers a SM, one warp instruction a cycle each
    clock: float = 1.98e9
    regs: int = 65536  # a SM
    reg_unit: int = 256  # registers are allocated a warp at a time, in units of 256
    max_warps: int = 64  # 2048 threads a SM
    max_ctas: int = 32
    smem: int = 228 * 1024
    smem_reserved: int = 1024  # a CTA
    smem_unit: int = 128

    @property
    def slots_per_16_bytes(self) -> float:
        """Warp instructions the SM's schedulers issue while HBM moves 16 bytes for each of 32 threads."""
        return 32 * 16 * self.sms * self.schedulers * self.clock / self.bandwidth

    def describe(self) -> str:
        return (f"{self.name}: {self.bandwidth / 1e12:.2f} TB/s, {self.sms} SMs x {self.schedulers} schedulers x "
                f"{self.clock / 1e9:.2f} GHz => {self.slots_per_16_bytes:.0f} issue slots per 16 bytes a thread "
                f"moves; issue = instructions a thread issues on its element path / "
                f"({self.slots_per_16_bytes:.0f} x bytes it moves there / 16)")


H100 = Machine()


def occupancy(regs: int, num_warps: int, shared: int, machine: Machine = H100) -> float:
    """Resident warps a SM over its maximum, from registers, shared memory and the CTA limit."""
    regs_per_warp = math.ceil(max(regs, 1) * 32 / machine.reg_unit) * machine.reg_unit
    by_regs = (machine.regs // regs_per_warp) // num_warps
    smem = math.ceil((shared + machine.smem_reserved) / machine.smem_unit) * machine.smem_unit
    by_smem = machine.smem // smem
    ctas = min(machine.max_ctas, by_regs, by_smem, machine.max_warps // num_warps)
    return ctas * num_warps / machine.max_warps


# --- the specs and their compilation -------------------------------------------------------------------


def kernel_specs() -> List[dict]:
    """Every ``AOT_SPECS`` entry of every fastsd.kernels module, each with ``"module"`` added."""
    import fastsd.kernels as pkg

    specs = []
    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{pkg.__name__}.{info.name}")
        specs.extend({**spec, "module": module.__name__} for spec in getattr(module, "AOT_SPECS", ()))
    return specs


@dataclasses.dataclass
class Compiled:
    ptx: str
    ttir: str
    cubin: bytes
    shared: int
    num_warps: int


def compile_spec(spec: dict, arch: int = ARCH) -> Compiled:
    """``triton.compile`` one spec for sm_<arch> in this process (TRITON_INTERPRET must be unset)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(fn=spec["fn"], signature=spec["signature"], constexprs=spec.get("constexprs"),
                    attrs=spec.get("attrs"))
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=spec.get("options"))
    return Compiled(compiled.asm["ptx"], compiled.asm["ttir"], compiled.asm["cubin"],
                    int(compiled.metadata.shared), int(compiled.metadata.num_warps))


# --- the NVIDIA tools ----------------------------------------------------------------------------------


def tool(name: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def _cache_dir() -> str:
    root = os.environ.get("FASTSD_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "fastsd")
    return os.path.join(root, "sass")


def disassemble(cubin: bytes) -> Dict[str, str]:
    """``{"sass": SASS text, "resources": cuobjdump --dump-resource-usage text}`` of a cubin (see
    :func:`disassemble_many`)."""
    return disassemble_many([cubin])[0]


def disassemble_many(cubins: List[bytes]) -> List[Dict[str, str]]:
    """:func:`disassemble` of each cubin, cached on disk by the cubin's hash; the SASS of the cache
    misses comes from one ``nvdisasm`` run over all their code (a few for much code, :func:`_sass_of`)."""
    results: List[Optional[Dict[str, str]]] = [None] * len(cubins)
    misses: Dict[str, tuple] = {}  # cache path -> (cubin, indices)
    for i, cubin in enumerate(cubins):
        key = hashlib.sha256(cubin + f"v{_CACHE_VERSION}".encode()).hexdigest()
        path = os.path.join(_cache_dir(), key[:2], key + ".json.z")
        try:
            with open(path, "rb") as f:
                results[i] = json.loads(zlib.decompress(f.read()))
            continue
        except (OSError, ValueError, zlib.error):
            pass
        misses.setdefault(path, (cubin, []))[1].append(i)
    if not misses:
        return results
    with tempfile.TemporaryDirectory(prefix="fastsd_sass_") as tmp:
        files = []
        for n, (cubin, _) in enumerate(misses.values()):
            files.append(os.path.join(tmp, f"k{n}.cubin"))
            with open(files[-1], "wb") as f:
                f.write(cubin)
        texts = _sass_of([cubin for cubin, _ in misses.values()], files, tmp)
        for (path, (_, indices)), cubin_path, sass in zip(misses.items(), files, texts):
            resources = subprocess.run([tool("cuobjdump"), "--dump-resource-usage", cubin_path], capture_output=True,
                                       text=True, check=True).stdout
            result = {"sass": sass, "resources": resources}
            for i in indices:
                results[i] = result
            try:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                tmp_path = f"{path}.{os.getpid()}.tmp"
                with open(tmp_path, "wb") as f:
                    f.write(zlib.compress(json.dumps(result).encode(), 6))
                os.replace(tmp_path, path)
            except OSError:
                pass  # a read-only home: no disk cache
    return results


# nvdisasm spends ~0.5 s of CPU starting up whatever it reads, ~2 s a MiB of code after that: the
# code goes to it in batches of about this size, two at a time.
_BATCH_BYTES = 2 << 20


def _sass_of(cubins: List[bytes], files: List[str], tmp: str) -> List[str]:
    """The SASS text of each cubin (``files`` holds them on disk) in ``nvdisasm -c`` form, as far as
    :func:`parse_sass` reads it: the entry kernel's code section of every cubin, concatenated, goes
    through one raw-mode ``nvdisasm -b SM<xy>`` run (per architecture and batch), whose output is
    split and rewritten per kernel (:meth:`_CodeSection.text`). A cubin that is not read that way is
    disassembled alone (``nvdisasm -c``)."""
    texts: List[Optional[str]] = [None] * len(cubins)
    by_arch: Dict[str, list] = {}
    for n, cubin in enumerate(cubins):
        try:
            code = _CodeSection.of(cubin)
        except (ValueError, IndexError, struct.error):
            continue  # disassembled alone below
        by_arch.setdefault(code.arch, []).append((n, code))
    batches = []
    for arch, codes in by_arch.items():
        size = sum(len(code.data) for _, code in codes)
        parts = max(1, math.ceil(size / _BATCH_BYTES))
        for p in range(parts):
            batches.append((arch, codes[p * len(codes) // parts:(p + 1) * len(codes) // parts]))

    def raw(b, batch):
        arch, codes = batch
        path = os.path.join(tmp, f"batch{b}.bin")
        with open(path, "wb") as f:
            f.write(b"".join(code.data for _, code in codes))
        # -ndf: no dataflow analysis (faster; the branch targets are printed all the same).
        out = subprocess.run([tool("nvdisasm"), "-b", arch, "-ndf", path], capture_output=True, text=True,
                             check=True).stdout
        lines: Dict[int, str] = {}
        for line in out.splitlines():
            m = _RAW_LINE.match(line)
            if m:
                lines[int(m.group(1), 16)] = m.group(2)
        start = 0
        for n, code in codes:
            try:
                texts[n] = code.text(lines, start)
            except ValueError:
                pass  # disassembled alone below
            start += len(code.data)

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        list(pool.map(raw, range(len(batches)), batches))
    for n, text in enumerate(texts):
        if text is None:
            texts[n] = subprocess.run([tool("nvdisasm"), "-c", "-ndf", files[n]], capture_output=True, text=True,
                                      check=True).stdout
    return texts


_RAW_LINE = re.compile(r"^\s*/\*([0-9a-f]+)\*/(.*)$")
# Instructions whose last operand is a code address (branch, call, return, convergence-barrier and
# warp-sync targets, LEPC's): raw mode prints it as an address, -c as a label or function name.
_ADDRESS_OPERAND = re.compile(r"^(\s*(?:@!?U?P(?:T|\d+)\s+)?(?:BRA|BSSY|CALL\.REL|RET\.REL|LEPC|WARPSYNC\.COLLECTIVE)"
                              r"\b[^;]*?)(0x[0-9a-f]+)(\s*;.*)$")
_STO_CUDA_ENTRY = 0x10


@dataclasses.dataclass
class _CodeSection:
    """The code section of a cubin's entry kernel (Triton's cubins hold one, its subroutines at its
    end): nvdisasm's ``-b`` name of the cubin's architecture, the bytes and the functions in it."""

    arch: str
    name: str
    data: bytes
    functions: Dict[int, tuple]  # offset -> (name, entry)

    @classmethod
    def of(cls, cubin: bytes) -> "_CodeSection":
        """Read from the ELF (64-bit little-endian) section headers and symbol table."""
        if cubin[:6] != b"\x7fELF\x02\x01":
            raise ValueError("not a 64-bit little-endian ELF file")
        (flags,) = struct.unpack_from("<I", cubin, 48)
        # e_flags: ABI version 7 has the SM in bits 0-7 and sm_XYa in bit 11, version 8 (CUDA 13's
        # Blackwell cubins) the SM in bits 8-15 and sm_XYa in bit 3.
        sm, accelerated = ((flags >> 8) & 0xFF, flags & 0x8) if cubin[8] >= 8 else (flags & 0xFF, flags & 0x800)
        (shoff,) = struct.unpack_from("<Q", cubin, 40)
        shentsize, shnum, shstrndx = struct.unpack_from("<HHH", cubin, 58)
        # (name, type, flags, addr, offset, size, link, info, addralign, entsize)
        sections = [struct.unpack_from("<IIQQQQIIQQ", cubin, shoff + i * shentsize) for i in range(shnum)]

        def string(table: int, offset: int) -> str:
            start = sections[table][4] + offset
            return cubin[start:cubin.index(b"\0", start)].decode()

        functions = []  # (name, st_other, section, offset)
        for section in sections:
            if section[1] == 2:  # SHT_SYMTAB
                for at in range(section[4], section[4] + section[5], 24):
                    name, info, other, index, value, _ = struct.unpack_from("<IBBHQQ", cubin, at)
                    if info & 0xF == 2:  # STT_FUNC
                        functions.append((string(section[6], name), other, index, value))
        entries = [f for f in functions if f[1] & _STO_CUDA_ENTRY]
        if len(entries) != 1:
            raise ValueError(f"{len(entries)} entry functions")
        index = entries[0][2]
        _, _, _, _, offset, size, *_ = sections[index]
        if size % 16:
            raise ValueError("code size not a whole number of instructions")
        return cls(f"SM{sm}{'a' if accelerated else ''}", string(shstrndx, sections[index][0]),
                   cubin[offset:offset + size],
                   {value: (name, bool(other & _STO_CUDA_ENTRY)) for name, other, i, value in functions if i == index})

    def text(self, lines: Dict[int, str], start: int) -> str:
        """This section's part of a raw disassembly (instruction text by address; this section at
        ``start``) as ``nvdisasm -c`` prints it: addresses in the section, function and entry lines,
        a ``.L_x_N`` label (numbered in the order of the first reference, like nvdisasm's) before
        each target instruction that does not start a function, targets in backticks."""
        body, labels = [], {}
        for addr in range(0, len(self.data), 16):
            line = lines.get(start + addr)
            if line is None:
                raise ValueError(f"no instruction at {addr:#x}")
            m = _ADDRESS_OPERAND.match(line)
            if m:
                # PC-relative in the encoding: printed as an address in the raw binary
                target = int(m.group(2), 16) - start
                if not 0 <= target < len(self.data):
                    raise ValueError(f"target {target:#x} outside the section")
                if target in self.functions:
                    name = self.functions[target][0]
                else:
                    name = labels.setdefault(target, f".L_x_{len(labels)}")
                line = f"{m.group(1)}`({name}){m.group(3)}"
            body.append((addr, line))
        out = [f"\t.section\t{self.name},\"ax\",@progbits"]
        for addr, line in body:
            if addr in self.functions:
                name, entry = self.functions[addr]
                out.append(f"        .type           {name},@function")
                if entry:
                    out.append(f"        .other          {name},@\"STO_CUDA_ENTRY STV_DEFAULT\"")
                out.append(f"{name}:")
            if addr in labels:
                out.append(f"{labels[addr]}:")
            out.append(f"        /*{addr:04x}*/{line}")
        return "\n".join(out) + "\n"


# --- SASS: instructions, control flow, paths -------------------------------------------------------------

_INSN = re.compile(r"^\s*/\*([0-9a-f]+)\*/\s+(@!?U?P(?:T|\d+)\s+)?([A-Z][A-Z0-9_]*(?:\.[A-Z0-9_]+)*)\s*(.*?)\s*;")
_LABEL = re.compile(r"^(\.L_x_\d+):")
_FUNC = re.compile(r"^\s*\.type\s+(\S+),@function")
_ENTRY = re.compile(r"^\s*\.other\s+(\S+),@\"STO_CUDA_ENTRY")
_TARGET = re.compile(r"`\(([^)]+)\)")
_TERMINATORS = {"BRA", "EXIT", "RET", "BRX", "JMX", "JMP", "KILL"}
_DIV_ROUTINE = re.compile(r"(?:div|rem)_[su]64\b")


@dataclasses.dataclass
class Insn:
    addr: int
    pred: str  # "" (always), "@P0", "@!P0", ...
    op: str  # "LDG.E.128"
    args: str

    @property
    def base(self) -> str:
        return self.op.split(".", 1)[0]

    @property
    def target(self) -> Optional[str]:
        m = _TARGET.search(self.args)
        return m.group(1) if m else None

    @property
    def conditional(self) -> bool:
        return self.pred not in ("", "@PT")


def parse_sass(text: str):
    """The entry function's instructions and every label's address (nvdisasm -c output)."""
    functions: Dict[str, List[Insn]] = {}
    labels: Dict[str, int] = {}
    pending: List[str] = []
    entry, current = None, None
    for line in text.splitlines():
        m = _FUNC.match(line)
        if m:
            current = m.group(1)
            functions.setdefault(current, [])
            continue
        m = _ENTRY.match(line)
        if m:
            entry = m.group(1)
            continue
        m = _LABEL.match(line)
        if m:
            pending.append(m.group(1))
            continue
        m = _INSN.match(line)
        if m and current is not None:
            insn = Insn(int(m.group(1), 16), (m.group(2) or "").strip(), m.group(3), m.group(4))
            for label in pending:
                labels[label] = insn.addr
            pending = []
            if insn.op != "NOP":
                functions[current].append(insn)
    entry = entry or next(iter(functions))
    return functions[entry], labels


class CFG:
    """Basic blocks of one function, their successors, back edges and innermost loops."""

    def __init__(self, insns: List[Insn], labels: Dict[str, int]):
        index = {insn.addr: i for i, insn in enumerate(insns)}
        leaders = {0}
        for i, insn in enumerate(insns):
            if insn.base in _TERMINATORS:
                leaders.add(i + 1)
                if insn.base == "BRA" and insn.target in labels and labels[insn.target] in index:
                    leaders.add(index[labels[insn.target]])
        starts = sorted(s for s in leaders if s < len(insns))
        self.blocks = [insns[s:e] for s, e in zip(starts, starts[1:] + [len(insns)])]
        block_of = {s: b for b, s in enumerate(starts)}
        self.succ: List[List[int]] = []
        for b, block in enumerate(self.blocks):
            last, nxt = block[-1], (b + 1 if b + 1 < len(self.blocks) else None)
            succ = []
            if last.base == "BRA":
                target = labels.get(last.target)
                if last.pred != "@!PT" and target in index:
                    succ.append(block_of[index[target]])
                if last.conditional and nxt is not None:
                    succ.append(nxt)
            elif last.base in _TERMINATORS:
                if last.conditional and nxt is not None:
                    succ.append(nxt)
            elif nxt is not None:
                succ.append(nxt)
            self.succ.append(succ)
        # Blocks that call an external function through a register (a failing device assert's
        # __assertfail, printf) or trap: never the common path.
        self.cold = {b for b, block in enumerate(self.blocks) if any(i.op.startswith(("CALL.ABS", "BPT")) for i in block)}
        self._dfs()

    def _dfs(self) -> None:
        """Reachable blocks, back edges (to a block on the DFS stack) and a topological order."""
        self.back = set()
        self.order: List[int] = []  # reverse postorder of the reachable blocks
        state = {0: 1}  # 1 on the stack, 2 done
        stack = [(0, iter(self.succ[0]))]
        while stack:
            b, it = stack[-1]
            for s in it:
                if state.get(s) == 1:
                    self.back.add((b, s))
                elif s not in state:
                    state[s] = 1
                    stack.append((s, iter(self.succ[s])))
                    break
            else:
                state[b] = 2
                self.order.append(b)
                stack.pop()
        self.order.reverse()
        self.reachable = set(self.order)

    def forward(self, b: int) -> List[int]:
        return [s for s in self.succ[b] if (b, s) not in self.back]

    def loops(self) -> Dict[int, set]:
        """Innermost natural loops: header -> body blocks (merged over the header's back edges)."""
        pred: Dict[int, List[int]] = {}
        for b in self.reachable:
            for s in self.succ[b]:
                pred.setdefault(s, []).append(b)
        bodies: Dict[int, set] = {}
        for latch, header in self.back:
            body, work = {header}, [latch]
            while work:
                n = work.pop()
                if n not in body:
                    body.add(n)
                    work.extend(pred.get(n, ()))
            bodies.setdefault(header, set()).update(body)
        return {h: body for h, body in bodies.items()
                if not any(other != h and other in body for other in bodies)}

    def longest_path(self, blocks: Optional[set] = None, start: int = 0, ends: Optional[set] = None) -> List[int]:
        """Blocks of the longest path (in instructions) from ``start`` within ``blocks`` (default: all
        reachable) along forward edges, ending at a block of ``ends`` (default: any block)."""
        blocks = (self.reachable if blocks is None else blocks) - self.cold
        best: Dict[int, tuple] = {}
        for b in reversed(self.order):
            if b not in blocks:
                continue
            tails = [best[s] for s in self.forward(b) if s in blocks and best.get(s)]
            if ends is None or b in ends:
                tails.append((0, []))
            if tails:
                length, path = max(tails, key=lambda t: t[0])
                best[b] = (length + len(self.blocks[b]), [b] + path)
            else:
                best[b] = None
        return (best.get(start) or (0, []))[1]


def global_access(insn: Insn):
    """("ld" | "st" | "atom", bits) for a global memory instruction, else None."""
    parts = insn.op.split(".")
    kind = {"LDG": "ld", "LDGSTS": "ld", "STG": "st", "ATOMG": "atom", "RED": "atom", "REDG": "atom"}.get(parts[0])
    if kind is None:
        return None
    bits = 32
    for p in parts[1:]:
        bits = {"U8": 8, "S8": 8, "U16": 16, "S16": 16, "64": 64, "128": 128}.get(p, bits)
    return kind, bits


def path_stats(insns: Iterable[Insn]) -> dict:
    """What a thread issues along a list of instructions."""
    stats = {"instr": 0, "ld": {}, "st": {}, "atom": {}, "bytes": 0, "bytes128": 0, "bar": 0, "div_seq": 0,
             "div64_calls": 0, "wide": 0, "local": 0}
    for insn in insns:
        stats["instr"] += 1
        access = global_access(insn)
        if access:
            kind, bits = access
            stats[kind][bits] = stats[kind].get(bits, 0) + 1
            stats["bytes"] += bits // 8
            stats["bytes128"] += 16 if bits == 128 else 0
        base = insn.base
        if base == "BAR":
            stats["bar"] += 1
        elif base == "I2F" and ".RP" in insn.op:  # the reciprocal that starts a 32-bit division
            stats["div_seq"] += 1
        elif base == "CALL" and _DIV_ROUTINE.search(insn.args):
            stats["div64_calls"] += 1
        elif insn.op.startswith(("IMAD.WIDE", "IMAD.HI")):
            stats["wide"] += 1
        elif base in ("LDL", "STL"):
            stats["local"] += 1
    return stats


# --- PTX and TTIR -------------------------------------------------------------------------------------

_PTX_DIV32 = re.compile(r"^\s*(?:@!?%p\d+\s+)?(?:div|rem)\.[su]32\b", re.M)
_PTX_DIV64 = re.compile(r"^\s*(?:@!?%p\d+\s+)?(?:div|rem)\.[su]64\b", re.M)
_PTX_MUL64 = re.compile(r"^\s*(?:@!?%p\d+\s+)?(?:mul|mad)\.lo\.[su]64\b", re.M)
_TTIR_CONST = re.compile(r"^\s*(%[\w.]+) = arith\.constant\b")
_TTIR_DIV = re.compile(r"^\s*%[\w.]+ = arith\.(?:div|rem|ceildiv|floordiv)[su]i (%[\w.]+), (%[\w.]+) : (\S+)")


def element_divisions(ttir: str) -> int:
    """Integer divisions in the per-element path: tensor-valued, or inside a loop, by a non-constant."""
    constants, depth, loop_depths, count = set(), 0, [], 0
    for line in ttir.splitlines():
        m = _TTIR_CONST.match(line)
        if m:
            constants.add(m.group(1))
        m = _TTIR_DIV.match(line)
        if m and m.group(2) not in constants and (m.group(3).startswith("tensor<") or loop_depths):
            count += 1
        opens = line.count("{") - line.count("}")
        if re.search(r"\bscf\.(?:for|while)\b", line) and opens > 0:
            loop_depths.append(depth + 1)
        depth += opens
        while loop_depths and depth < loop_depths[-1]:
            loop_depths.pop()
    return count


# --- one spec -----------------------------------------------------------------------------------------

_RESOURCES = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")


def analyze(spec: dict, compiled: Compiled, sass: Dict[str, str], machine: Machine = H100) -> dict:
    """One row of the report (see the module docstring for every field)."""
    regs, stack, static_smem, local = map(int, _RESOURCES.search(sass["resources"]).groups())
    insns, labels = parse_sass(sass["sass"])
    cfg = CFG(insns, labels)
    whole = path_stats(i for b in cfg.reachable for i in cfg.blocks[b])

    def stats_of(blocks):
        return path_stats(i for b in blocks for i in cfg.blocks[b])

    candidates = []
    for header, body in sorted(cfg.loops().items()):
        if not stats_of(body)["bytes"]:
            continue  # no global memory: not an element loop
        latches = {b for b, h in cfg.back if h == header and b in body}
        st = stats_of(cfg.longest_path(body, header, latches))
        candidates.append((f"loop@{cfg.blocks[header][0].addr:#x}", st))
    if not candidates:
        candidates.append(("straight", stats_of(cfg.longest_path())))
    moved = spec.get("moved_bytes")

    def share(st):
        nbytes = moved or st["bytes"]
        return st["instr"] / (machine.slots_per_16_bytes * nbytes / 16) if nbytes else math.inf

    path, st = max(candidates, key=lambda c: share(c[1]))
    shared = compiled.shared + static_smem
    return {
        "name": spec["name"], "module": spec.get("module"), "kernel": getattr(spec["fn"], "__name__", None)
        or spec["fn"].fn.__name__, "num_warps": compiled.num_warps,
        # the launch-time constants, so that a measured launch finds the variant it ran (gpu_report)
        # (named ones only: a tuple argument's constants are keyed by (name, index))
        "constexprs": {k: v for k, v in (spec.get("constexprs") or {}).items()
                       if isinstance(k, str) and isinstance(v, (bool, int, float, str))},
        "regs": regs, "spill": whole["local"] + stack + local, "smem": shared,
        "occupancy": occupancy(regs, compiled.num_warps, shared, machine),
        "path": path, "instr": st["instr"], "static_bytes": st["bytes"], "bytes": moved or st["bytes"],
        "issue": share(st), "ld": st["ld"], "st": st["st"], "atom": st["atom"],
        "w128": st["bytes128"] / st["bytes"] if st["bytes"] else 0.0,
        "div": len(_PTX_DIV32.findall(compiled.ptx)), "div64": len(_PTX_DIV64.findall(compiled.ptx)),
        "div64_calls": whole["div64_calls"], "ediv": element_divisions(compiled.ttir),
        "div_seq": st["div_seq"], "mul64": len(_PTX_MUL64.findall(compiled.ptx)), "wide": st["wide"],
        "bar": st["bar"], "total_instr": len(insns),
    }


# --- the report ---------------------------------------------------------------------------------------

_ROWS: Dict[tuple, dict] = {}


def _rows_here(names: Optional[Iterable[str]], arch: int) -> List[dict]:
    specs = kernel_specs()
    if names is not None:
        wanted = set(names)
        specs = [s for s in specs if s["name"] in wanted]
    todo = [s for s in specs if (s["name"], arch) not in _ROWS]
    jobs = []
    for spec in todo:
        try:
            jobs.append((spec, compile_spec(spec, arch)))
        except Exception as exc:  # reported per spec, so one failure does not hide the others
            _ROWS[(spec["name"], arch)] = {"name": spec["name"], "module": spec["module"],
                                           "error": f"{exc.__class__.__name__}: {exc}"}
    # Then the SASS of them all at once (one nvdisasm run reads every kernel not in the disk cache).
    for (spec, compiled), sass in zip(jobs, disassemble_many([compiled.cubin for _, compiled in jobs])):
        _ROWS[(spec["name"], arch)] = analyze(spec, compiled, sass)
    return [_ROWS[(s["name"], arch)] for s in specs]


def report(names: Optional[Iterable[str]] = None, arch: int = ARCH) -> List[dict]:
    """Rows of the report for the named specs (default: all). Under TRITON_INTERPRET=1 the kernels
    are compiled in a subprocess without it (tests)."""
    if os.environ.get("TRITON_INTERPRET", "0") != "1":
        return _rows_here(names, arch)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "fastsd.bench.sass", "--json", "-", "--arch", str(arch)]
    if names is not None:
        cmd += ["--names", ",".join(names)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"fastsd.bench.sass failed (rc={proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout)["kernels"]


def _widths(counts: dict) -> str:
    return "/".join(f"{n}x{bits}" for bits, n in sorted(((int(b), n) for b, n in counts.items()), reverse=True)) or "-"


COLUMNS = [("name", "{}"), ("regs", "{}"), ("spill", "{}"), ("smem", "{}"), ("occ", "{:.0%}"), ("ld", "{}"),
           ("st", "{}"), ("w128", "{:.0%}"), ("div", "{}"), ("div64", "{}"), ("ediv", "{}"), ("mul64", "{}"),
           ("wide", "{}"), ("bar", "{}"), ("path", "{}"), ("instr", "{}"), ("bytes", "{}"), ("issue", "{:.0%}")]


def format_table(rows: List[dict], machine: Machine = H100) -> str:
    lines = [f"Compiled code of every Triton kernel spec for sm_{ARCH}. Model: {machine.describe()}.",
             "ld/st: global accesses on the element path, count x bits; w128: share of their bytes in "
             "128-bit accesses; div/div64: 32/64-bit integer div+rem in the PTX; ediv: of them per element "
             "(TTIR); mul64: 64-bit multiplies (PTX); wide: IMAD.WIDE/HI on the path; bar: barriers on the path."]
    header = [key for key, _ in COLUMNS]
    table = [header]
    for row in rows:
        if "error" not in row:
            values = {**row, "occ": row["occupancy"], "ld": _widths(row["ld"]), "st": _widths(row["st"])}
            table.append([fmt.format(values[key]) for key, fmt in COLUMNS])
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in table]
    lines += [f"{row['name']}: ERROR {row['error']}" for row in rows if "error" in row]
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastsd.bench.sass", description=__doc__.split("\n\n")[0])
    parser.add_argument("-k", dest="pattern", help="only specs whose name contains this")
    parser.add_argument("--names", help="only these specs (comma-separated)")
    parser.add_argument("--arch", type=int, default=ARCH)
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON to PATH ('-': stdout only)")
    args = parser.parse_args(argv)
    names = args.names.split(",") if args.names else None
    if args.pattern:
        names = [s["name"] for s in kernel_specs() if args.pattern in s["name"] and (names is None or s["name"] in names)]
    rows = report(names, args.arch)
    doc = {"arch": args.arch, "model": {**dataclasses.asdict(H100), "slots_per_16_bytes": H100.slots_per_16_bytes,
                                                                      "description": H100.describe()},
           "kernels": rows}
    if args.json == "-":
        json.dump(doc, sys.stdout, default=str)
        return 0
    print(format_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
