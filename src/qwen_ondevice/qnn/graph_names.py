"""The QNN graph names of a bundle's context binaries, in the form Genie reads.

Genie orders the parts of a model by the ``<prefix>_<i>_of_<N>`` ending of their graph names,
and for a graph without ``input_ids``/``attention_mask``/KV tensors (the embedding part) it reads
AR and CL from the name: the first ``ar<digits>`` and ``cl<digits>``, after which it calls
``std::stoi`` on every all-digit ``_``-separated piece (docs/graph-contract.md, "Names for QNN
and Genie"). Qualcomm AI Hub names the graphs of its bundles ``prompt_ar128_cl4096_1_of_4``
(prompt processor) and ``token_ar1_cl4096_1_of_4`` (token generator); :func:`graph_name` gives
those names.

ONNX Runtime cannot be told the QNN graph name: the QNN EP names each graph after ONNX Runtime's
fused node, ``QNNExecutionProvider_QNNExecutionProvider_<hash>_1_0`` (the hash, up to 20 digits,
overflows ``stoi``). :func:`rename_graph` therefore rewrites the name inside the .bin at the same
length (each graph name is stored length-prefixed, several times, with no checksum over it), the
new name padded with :data:`FILLER` characters that Genie's parse ignores, and
:func:`set_partition_name` points the EPContext wrapper at the new name.
"""

from __future__ import annotations

import mmap
import re
from pathlib import Path

import onnx

from qwen_ondevice.core.errors import UserError

#: Padding for a renamed graph: no ``ar``/``cl`` and no digit, so Genie's name parse reads only
#: the real AR, CL, i and N.
FILLER = "x"
#: What Genie's part ordering reads at the end of a graph name.
PART_SUFFIX = re.compile(r"_(\d+)_of_(\d+)$")


class RenameError(UserError):
    """A graph could not be renamed inside a context binary (one-line message)."""


def graph_name(ar: int, context_length: int, index: int, num_parts: int) -> str:
    """AI Hub's graph name of part ``index`` of ``num_parts`` (1-based) at AR ``ar``:
    ``prompt_ar{AR}_cl{CL}_{i}_of_{N}`` for a prompt processor (AR > 1) and
    ``token_ar1_cl{CL}_{i}_of_{N}`` for the token generator (AR 1)."""
    kind = "token" if ar == 1 else "prompt"
    return f"{kind}_ar{ar}_cl{context_length}_{index}_of_{num_parts}"


def parse_graph_name(name: str) -> tuple[int | None, int | None, int | None, int | None]:
    """(AR, CL, i, N) as Genie reads them from a graph name: the first ``ar<digits>`` and
    ``cl<digits>`` (``_`` allowed before the digits) and the ``_{i}_of_{N}`` ending; None where
    absent. Raises ValueError for an all-digit ``_`` piece that ``std::stoi`` cannot take (over
    2**31 - 1), as Genie's own parse fails there."""
    for piece in name.split("_"):
        if piece.isdigit() and int(piece) > 2**31 - 1:
            raise ValueError(f"graph name {name!r}: the piece {piece} overflows Genie's stoi")
    ar, cl = re.search(r"(?:ar|AR)_?(\d+)", name), re.search(r"(?:cl|CL)_?(\d+)", name)
    m = PART_SUFFIX.search(name)
    return (int(ar.group(1)) if ar else None, int(cl.group(1)) if cl else None,
            int(m.group(1)) if m else None, int(m.group(2)) if m else None)


def padded_name(name: str, length: int) -> str:
    """``name`` padded to ``length`` characters with :data:`FILLER` placed before its
    ``_{i}_of_{N}`` ending (``prompt_ar128_cl4096_xxxx_1_of_4``), so that both Genie's AR/CL parse
    and its part ordering still read it.

    Raises:
        RenameError: ``name`` is longer than ``length`` or has no ``_{i}_of_{N}`` ending.
    """
    if len(name) > length:
        raise RenameError(f"graph name {name!r} ({len(name)} characters) does not fit in the {length} characters of the old name")
    m = PART_SUFFIX.search(name)
    if m is None:
        raise RenameError(f"graph name {name!r} has no _<i>_of_<N> ending")
    pad = length - len(name)
    if pad == 0:
        return name
    head = name[: m.start()]
    return f"{head}_{FILLER * (pad - 1)}{name[m.start():]}" if pad > 1 else f"{head}{FILLER}{name[m.start():]}"


def rename_graph(bin_path: Path, old: str, new: str) -> int:
    """Rewrite every occurrence of graph name ``old`` in the context binary ``bin_path`` as ``new``
    (in place, memory-mapped: a part's .bin can be gigabytes); returns the number of occurrences.

    ``new`` must have the length of ``old`` (see :func:`padded_name`); an occurrence must stand
    alone (not be the start of a longer name).

    Raises:
        RenameError: ``old`` is not in the file, ``new`` has another length, or ``old`` is still
            found after the rewrite.
    """
    if len(new) != len(old):
        raise RenameError(f"{bin_path.name}: new graph name {new!r} must have the {len(old)} characters of {old!r}")
    o, n = old.encode(), new.encode()
    with open(bin_path, "r+b") as f, mmap.mmap(f.fileno(), 0) as mm:
        spots, at = [], mm.find(o)
        while at != -1:
            after = mm[at + len(o): at + len(o) + 1]
            if not (after.isalnum() or after == b"_"):
                spots.append(at)
            at = mm.find(o, at + 1)
        if not spots:
            raise RenameError(f"{bin_path.name}: graph name {old!r} not found in the context binary")
        for at in spots:
            mm[at: at + len(o)] = n
        mm.flush()
        if mm.find(o) != -1:
            raise RenameError(f"{bin_path.name}: graph name {old!r} is still found after renaming it to {new!r}")
    return len(spots)


def set_partition_name(wrapper: Path, old: str, new: str) -> None:
    """Point the EPContext wrapper model ``wrapper`` at the renamed graph: its EPContext node's
    ``partition_name`` goes from ``old`` to ``new``.

    Raises:
        RenameError: the wrapper has no EPContext node with ``partition_name`` ``old``.
    """
    model = onnx.load(str(wrapper), load_external_data=False)
    hits = 0
    for node in model.graph.node:
        if node.op_type != "EPContext":
            continue
        for a in node.attribute:
            if a.name == "partition_name" and a.s == old.encode():
                a.s = new.encode()
                hits += 1
    if hits != 1:
        raise RenameError(f"{wrapper.name}: expected one EPContext node for graph {old!r}, found {hits}")
    wrapper.write_bytes(model.SerializeToString())
