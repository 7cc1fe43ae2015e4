"""Where `covey node` takes its token from: --token, --token - (standard input), --token-file."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from swarm.node.main import token_option
from swarm.trust.token import TokenError


def test_a_token_file_is_read_and_trimmed(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text("  covey1-abc \n")
    assert token_option(None, path, io.StringIO("ignored")) == "covey1-abc"


def test_a_dash_reads_one_line_of_standard_input() -> None:
    assert token_option("-", None, io.StringIO("covey1-abc\nmore\n")) == "covey1-abc"


def test_a_token_on_the_command_line_or_none_at_all_passes_through() -> None:
    assert token_option("covey1-abc", None, io.StringIO()) == "covey1-abc"
    assert token_option(None, None, io.StringIO()) is None


@pytest.mark.parametrize("contents", ["", "  \n"])
def test_an_empty_file_or_input_says_so(tmp_path: Path, contents: str) -> None:
    path = tmp_path / "token"
    path.write_text(contents)
    with pytest.raises(TokenError, match="empty"):
        token_option(None, path, io.StringIO())
    with pytest.raises(TokenError, match="standard input"):
        token_option("-", None, io.StringIO(contents))


def test_a_missing_file_names_it(tmp_path: Path) -> None:
    with pytest.raises(TokenError, match=r"--token-file .*nope.*No such file"):
        token_option(None, tmp_path / "nope", io.StringIO())
