"""The texts shipped with the package (WikiText-2, CC BY-SA 3.0) and the token ids of a text file:
calibration reads the validation split, evaluation and the export's report the test split."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from qwen_ondevice.core.errors import UserError


def default_calibration_text() -> Path:
    """The calibration text shipped with the package (WikiText-2 validation split, CC BY-SA 3.0)."""
    return Path(str(resources.files("qwen_ondevice") / "data" / "wikitext2_valid.txt"))


def default_evaluation_text() -> Path:
    """The held-out text shipped with the package (WikiText-2 test split, CC BY-SA 3.0)."""
    return Path(str(resources.files("qwen_ondevice") / "data" / "wikitext2_test.txt"))


def text_token_ids(tokenizer, path: Path, n_tokens: int, what: str = "calibration") -> list[int]:
    """The first ``n_tokens`` token ids of the text file ``path``.

    Raises:
        UserError: the file is missing or holds fewer than ``n_tokens`` tokens.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{what} text {path} does not exist") from None
    except UnicodeDecodeError:
        raise UserError(f"{what} text {path} is not UTF-8 text") from None
    # Tokenize a prefix that is surely long enough (a token is at least one character here).
    ids = tokenizer.encode(text[: max(n_tokens * 16, 1 << 16)])
    if len(ids) < n_tokens:
        ids = tokenizer.encode(text)
    if len(ids) < n_tokens:
        raise UserError(f"{what} text {path} holds {len(ids)} tokens, fewer than the {n_tokens} asked for; pass a longer text or ask for fewer tokens")
    return ids[:n_tokens]
