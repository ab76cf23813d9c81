"""The stop-string matcher under adversarial token splits."""

from __future__ import annotations

import itertools

import pytest

from server.serving.stops import StopMatcher


def run(pieces: list[str], stops: list[str]) -> tuple[str, bool, list[str]]:
    """Feed pieces; return (all emitted text, whether stopped, what each push emitted)."""
    m = StopMatcher(stops)
    emitted: list[str] = []
    for p in pieces:
        out, hit = m.push(p)
        emitted.append(out)
        if hit:
            return "".join(emitted), True, emitted
    emitted.append(m.flush())
    return "".join(emitted), False, emitted


def splits(text: str, parts: int) -> list[list[str]]:
    """Every way to cut ``text`` into ``parts`` non-empty pieces."""
    out = []
    for cuts in itertools.combinations(range(1, len(text)), parts - 1):
        bounds = (0, *cuts, len(text))
        out.append([text[a:b] for a, b in itertools.pairwise(bounds)])
    return out


TEXT = "is 42.\nEND of it"


@pytest.mark.parametrize("parts", [1, 2, 3, 4])
def test_stop_over_any_token_split(parts: int) -> None:
    cases = splits(TEXT, parts)
    assert cases
    for pieces in cases:
        text, hit, emitted = run(pieces, ["\nEND", "42.\nEX"])
        assert hit, pieces
        assert text == "is 42.", pieces
        assert not any("\n" in e for e in emitted), pieces


def test_stop_with_one_character_per_token() -> None:
    text, hit, _ = run(list(TEXT), ["\nEND"])
    assert hit
    assert text == "is 42."


def test_stop_spread_over_three_tokens_never_leaks_a_prefix() -> None:
    text, hit, emitted = run(["ab", "c<", "|e", "nd", "|>tail"], ["<|end|>"])
    assert hit
    assert text == "abc"
    assert emitted == ["ab", "c", "", "", ""]


def test_held_text_released_when_it_cannot_become_a_stop() -> None:
    m = StopMatcher(["STOP"])
    assert m.push("xST") == ("x", False)
    assert m.push("Ox") == ("STOx", False)
    assert m.flush() == ""


def test_overlapping_candidates_pick_the_earliest_stop() -> None:
    text, hit, _ = run(["aaab", "cd"], ["abcd", "aab"])
    assert hit
    assert text == "a"


def test_overlapping_self_prefix_stop() -> None:
    # "aab" must be found although "aa" was a held prefix that then failed at a different offset.
    text, hit, _ = run(["a", "a", "a", "b", "zzz"], ["aab"])
    assert hit
    assert text == "a"


def test_several_stops_first_occurrence_wins_regardless_of_order() -> None:
    for stops in (["world", "o"], ["o", "world"]):
        text, hit, _ = run(["Hello ", "world"], stops)
        assert hit
        assert text == "Hell"


def test_no_stop_flushes_everything() -> None:
    text, hit, _ = run(["I am ", "almost ", "<|en"], ["<|end|>"])
    assert not hit
    assert text == "I am almost <|en"


def test_text_after_stop_is_ignored() -> None:
    m = StopMatcher(["x"])
    assert m.push("axb") == ("a", True)
    assert m.push("more") == ("", True)
    assert m.flush() == ""


def test_multibyte_and_emoji_stops() -> None:
    text, hit, _ = run(["héllo ", "👋", " wörld"], ["👋 w"])
    assert hit
    assert text == "héllo "


def test_empty_stop_rejected() -> None:
    with pytest.raises(ValueError, match="non-empty"):
        StopMatcher([""])
