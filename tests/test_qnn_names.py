"""Graph names in AI Hub's form, and renaming a graph inside a context binary in place."""

from __future__ import annotations

import pytest

from qwen_ondevice.qnn.graph_names import RenameError, graph_name, padded_name, parse_graph_name, rename_graph

ORT_NAME = "QNNExecutionProvider_QNNExecutionProvider_16439428452254065561_1_0"


def test_graph_names_are_ai_hubs():
    assert graph_name(128, 4096, 1, 4) == "prompt_ar128_cl4096_1_of_4"
    assert graph_name(1, 4096, 4, 4) == "token_ar1_cl4096_4_of_4"


def test_padded_name_keeps_what_genie_parses():
    for ar, i in ((128, 1), (1, 3)):
        name = padded_name(graph_name(ar, 4096, i, 4), len(ORT_NAME))
        assert len(name) == len(ORT_NAME) and name.endswith(f"_{i}_of_4")
        assert parse_graph_name(name) == (ar, 4096, i, 4)
    # Genie's own parse of ONNX Runtime's name fails (std::stoi overflows on the hash)
    with pytest.raises(ValueError, match="stoi"):
        parse_graph_name(ORT_NAME)


def test_a_name_that_does_not_fit_is_refused():
    with pytest.raises(RenameError, match="does not fit"):
        padded_name(graph_name(128, 4096, 1, 4), 10)
    with pytest.raises(RenameError, match="_of_"):
        padded_name("prompt_ar128_cl4096", 40)


def _blob(tmp_path, *pieces: bytes):
    p = tmp_path / "ctx.bin"
    p.write_bytes(b"".join(pieces))
    return p


def test_rename_rewrites_every_occurrence_in_place(tmp_path):
    old = ORT_NAME.encode()
    p = _blob(tmp_path, b"\x00" * 100, len(old).to_bytes(4, "little"), old, b"\x01" * 50, b"PICKLE/256/" + old, b"\x00" * 9)
    before = p.read_bytes()
    new = padded_name(graph_name(128, 4096, 2, 3), len(ORT_NAME))
    assert rename_graph(p, ORT_NAME, new) == 2
    after = p.read_bytes()
    assert len(after) == len(before) and after.count(new.encode()) == 2 and old not in after
    # nothing but the names changed
    assert after.replace(new.encode(), old) == before


def test_rename_fails_when_the_old_name_is_missing_or_survives_or_lengths_differ(tmp_path):
    old = ORT_NAME.encode()
    p = _blob(tmp_path, b"\x00" * 64)
    with pytest.raises(RenameError, match="not found"):
        rename_graph(p, ORT_NAME, "x" * len(ORT_NAME))
    # an occurrence that is the start of a longer name is not this graph's: it is left, and the
    # rename fails because the old name is still there afterwards
    p = _blob(tmp_path, old, b"\x00", old + b"7", b"\x00")
    with pytest.raises(RenameError, match="still found"):
        rename_graph(p, ORT_NAME, padded_name(graph_name(1, 64, 1, 2), len(ORT_NAME)))
    p = _blob(tmp_path, old)
    with pytest.raises(RenameError, match="must have"):
        rename_graph(p, ORT_NAME, "token_ar1_cl64_1_of_2")
    assert p.read_bytes() == old  # a refused rename leaves the file as it was
