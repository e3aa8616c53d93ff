"""The secrets parser fed random text (issue 18, "no input may" end in a traceback): a secrets
file or a ``secrets_command``'s output either gives values every host can put in a process's
environment, or one clean error naming the line, without the secret's text."""

from __future__ import annotations

import json
import os
from pathlib import Path

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from shiplane.agent.runtime import read_env_file
from shiplane.config.formats import parse_env
from shiplane.errors import UsageError

SECRET = "s3cr3t-Value"

# lines as people write them, with the characters that break parsers: quotes, escapes, NUL,
# lone surrogates (as a JSON escape), separators and line breaks of other systems
LINE = st.one_of(
    st.text(max_size=40),
    st.builds(
        lambda key, quote, body: f"{key}={quote}{body}{quote}",
        st.sampled_from(["KEY", "export KEY", "K_1", "1K", "ké", " KEY ", ""]),
        st.sampled_from(["", '"', "'"]),
        st.one_of(
            st.text(max_size=20),
            st.sampled_from(
                [
                    SECRET,
                    "\\",
                    "a\\b",
                    "\\u0000",
                    "\\ud800",
                    "\\n",
                    '\\"',
                    "\x00",
                    "\u2028",
                    "\r",
                    f"{SECRET}\\",
                ]
            ),
        ),
    ),
)


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lines=st.lists(LINE, max_size=6), newline=st.sampled_from(["\n", "\r\n", "\r"]))
def test_secrets_text_parses_to_usable_values_or_one_clean_error(
    lines: list[str], newline: str
) -> None:
    text = newline.join(lines)
    try:
        values = parse_env(text, "secrets.env", echo=False)
    except UsageError as exc:
        assert exc.message.strip()
        assert SECRET not in exc.message and SECRET not in (exc.hint or ""), exc.message
        event("refused")
        return
    event("parsed")
    for key, value in values.items():
        # what a host will do with it: the env file line, read back, then a process environment
        line = f"{key}={json.dumps(value)}"
        assert "\n" not in line
        os.fsencode(key + value)  # what subprocess does: raises on a lone surrogate
        assert "\0" not in key + value, "no process environment holds a NUL"


def test_a_value_no_process_environment_can_hold_is_refused_naming_the_line(
    tmp_path: Path,
) -> None:
    for bad in ('KEY="a\\u0000b"', 'KEY="\\ud800"', "KEY=a\x00b"):
        try:
            parse_env(f"OK=1\n{bad}\n", "secrets.env", echo=False)
        except UsageError as exc:
            assert "secrets.env:2" in exc.message and "KEY" in exc.message, exc.message
        else:
            raise AssertionError(f"{bad!r} was accepted")


def test_quoted_values_round_trip_through_the_host_env_file(tmp_path: Path) -> None:
    values = parse_env(
        'A="line\\nbreak"\nB=\'single \\ kept\'\nC="back\\\\slash"\nexport D = plain # not a comment\n',
        "s.env",
        echo=False,
    )
    env_file = tmp_path / "shiplane.env"
    env_file.write_text("".join(f"{k}={json.dumps(v)}\n" for k, v in values.items()))
    assert read_env_file(env_file) == values
    assert values["A"] == "line\nbreak" and values["C"] == "back\\slash"
    assert values["B"] == "single \\ kept" and values["D"] == "plain # not a comment"
