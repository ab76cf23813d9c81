"""An incremental JSON syntax checker: text arriving piece by piece is judged (and compacted) as it comes.

``json.loads`` can only judge complete text; a stream of tool-call arguments must be checked, and its insignificant
whitespace dropped, one character at a time.
"""

from __future__ import annotations

from typing import Final

_JSON_WS: Final = frozenset(" \t\n\r")
_DIGITS: Final = frozenset("0123456789")
_HEX: Final = frozenset("0123456789abcdefABCDEF")
_ESCAPES: Final = frozenset('"\\/bfnrt')
_LITERALS: Final = {"t": "rue", "f": "alse", "n": "ull"}

# Lexer states: structural ones, inside a string or literal, then the number states (all >= _N_MINUS).
(_VALUE, _VALUE_OR_CLOSE, _KEY, _KEY_OR_CLOSE, _COLON, _AFTER, _STRING, _ESCAPE, _UNICODE, _LITERAL, _DONE) = range(11)
_N_MINUS, _N_ZERO, _N_INT, _N_DOT, _N_FRAC, _N_EXP_MARK, _N_EXP_SIGN, _N_EXP = range(11, 19)
_NUMBER_CAN_END: Final = frozenset({_N_ZERO, _N_INT, _N_FRAC, _N_EXP})

# Events, each with the container depth (``level``) of the value or key concerned.
BEGIN, END, KEY_BEGIN, KEY_END = range(4)


def _number_step(state: int, ch: str) -> int | None:
    """The next number state, or ``None`` when ``ch`` is not part of the number."""
    if ch in _DIGITS:
        if state == _N_MINUS:
            return _N_ZERO if ch == "0" else _N_INT
        if state == _N_INT:
            return _N_INT
        if state in (_N_DOT, _N_FRAC):
            return _N_FRAC
        if state in (_N_EXP_MARK, _N_EXP_SIGN, _N_EXP):
            return _N_EXP
        return None  # a leading zero takes no more digits
    if ch == "." and state in (_N_ZERO, _N_INT):
        return _N_DOT
    if ch in ("e", "E") and state in (_N_ZERO, _N_INT, _N_FRAC):
        return _N_EXP_MARK
    if ch in ("+", "-") and state == _N_EXP_MARK:
        return _N_EXP_SIGN
    return None


class JsonLexer:
    """Checks strict JSON (RFC 8259: no NaN, no comments) one character at a time.

    After each :meth:`feed`, ``events`` lists the values and keys that began or ended at that character and
    ``significant`` says whether the character belongs to the compact text (whitespace between tokens does not).
    A number ends only at the character after it, so its end event comes with that character.
    """

    __slots__ = ("events", "is_key", "literal", "significant", "stack", "state", "unicode_left")

    def __init__(self) -> None:
        self.stack: list[str] = []
        self.state = _VALUE
        self.is_key = False
        self.literal = ""
        self.unicode_left = 0
        self.significant = False
        self.events: list[tuple[int, int]] = []

    @property
    def done(self) -> bool:
        """Whether one complete top-level value was read (only whitespace may follow)."""
        return self.state == _DONE

    def feed(self, ch: str) -> bool:
        """Consume one character; ``False`` means the text so far can no longer be JSON."""
        self.events.clear()
        self.significant = True
        state = self.state
        if state >= _N_MINUS:
            step = _number_step(state, ch)
            if step is not None:
                self.state = step
                return True
            if state not in _NUMBER_CAN_END:
                return False
            self._end()
            state = self.state
        if state == _STRING:
            if ch == '"':
                if self.is_key:
                    self.events.append((KEY_END, len(self.stack)))
                    self.state = _COLON
                else:
                    self._end()
            elif ch == "\\":
                self.state = _ESCAPE
            elif ch < " ":
                return False  # raw control characters must be escaped
            return True
        if state == _ESCAPE:
            if ch == "u":
                self.state, self.unicode_left = _UNICODE, 4
            elif ch in _ESCAPES:
                self.state = _STRING
            else:
                return False
            return True
        if state == _UNICODE:
            if ch not in _HEX:
                return False
            self.unicode_left -= 1
            if not self.unicode_left:
                self.state = _STRING
            return True
        if state == _LITERAL:
            if ch != self.literal[0]:
                return False
            self.literal = self.literal[1:]
            if not self.literal:
                self._end()
            return True
        if ch in _JSON_WS:
            self.significant = False
            return True
        if state in (_VALUE, _VALUE_OR_CLOSE):
            if ch == "]" and state == _VALUE_OR_CLOSE:
                return self._close(ch)
            return self._begin(ch)
        if state in (_KEY, _KEY_OR_CLOSE):
            if ch == '"':
                self.events.append((KEY_BEGIN, len(self.stack)))
                self.state, self.is_key = _STRING, True
                return True
            return ch == "}" and state == _KEY_OR_CLOSE and self._close(ch)
        if state == _COLON:
            if ch != ":":
                return False
            self.state = _VALUE
            return True
        if state == _AFTER:
            if ch == ",":
                self.state = _KEY if self.stack[-1] == "{" else _VALUE
                return True
            return self._close(ch)
        return False  # _DONE: nothing may follow the value but whitespace

    def _begin(self, ch: str) -> bool:
        self.events.append((BEGIN, len(self.stack)))
        if ch in ("{", "["):
            self.stack.append(ch)
            self.state = _KEY_OR_CLOSE if ch == "{" else _VALUE_OR_CLOSE
        elif ch == '"':
            self.state, self.is_key = _STRING, False
        elif ch == "-":
            self.state = _N_MINUS
        elif ch in _DIGITS:
            self.state = _N_ZERO if ch == "0" else _N_INT
        elif ch in _LITERALS:
            self.state, self.literal = _LITERAL, _LITERALS[ch]
        else:
            return False
        return True

    def _close(self, ch: str) -> bool:
        if not self.stack or ch != ("}" if self.stack[-1] == "{" else "]"):
            return False
        self.stack.pop()
        self._end()
        return True

    def _end(self) -> None:
        self.events.append((END, len(self.stack)))
        self.state = _AFTER if self.stack else _DONE


def compact_json_object(text: str) -> str | None:
    """``text`` without whitespace between tokens if it is one JSON object (surrounding whitespace allowed)."""
    lexer = JsonLexer()
    out: list[str] = []
    for ch in text.strip(" \t\n\r"):
        if not out and ch != "{":
            return None
        if not lexer.feed(ch):
            return None
        if lexer.significant:
            out.append(ch)
    return "".join(out) if lexer.done else None
