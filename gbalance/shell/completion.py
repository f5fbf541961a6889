"""Tab completion for ``balance -i`` on a terminal.

Completes command names, then each argument from the command's synopsis
(as the shell's command table writes it): ``<channel>`` with the channel
numbers of the current group (or, after a ``<group>`` argument, of that
group), ``<group>`` with the group numbers, ``[a|b|c]`` with its words.
The numbers are read from the state file at each Tab, so channels created
by another session complete too.  :class:`Completer` knows nothing about
readline; :func:`install_completion` connects it to a shell session.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from collections.abc import Callable, Iterable, Sequence


@dataclass(frozen=True)
class Syntax:
    """A command as completion sees it: its name and argument kinds."""

    name: str
    args: tuple[str, ...]   # "channel", "group", "words:a|b|c" or "other"


def arg_kinds(synopsis: str) -> tuple[str, ...]:
    """``"<group> <channel>"`` -> ``("group", "channel")``; ``"[a|b]"`` -> ``("words:a|b",)``."""
    kinds = []
    for token in synopsis.split():
        bare = token.strip("<>[]")
        if bare in ("channel", "group"):
            kinds.append(bare)
        elif "|" in bare:
            kinds.append("words:" + bare)
        else:
            kinds.append("other")
    return tuple(kinds)


class Completer:
    """Candidates for the word under the cursor; ``complete`` is readline's protocol."""

    def __init__(self, syntaxes: Iterable[Syntax], groups: Callable[[], int], channels: Callable[[int], int],
                 current_group: Callable[[], int]):
        self.syntaxes = [s for s in syntaxes if re.fullmatch(r"[a-z][a-z-]*", s.name)]
        self.groups = groups
        self.channels = channels
        self.current_group = current_group
        self._matches: list[str] = []

    def _syntax(self, word: str) -> Syntax | None:
        """The command ``word`` names: exactly, else the first it abbreviates (as the shell does)."""
        word = word.lower()
        for syntax in self.syntaxes:
            if syntax.name == word:
                return syntax
        return next((s for s in self.syntaxes if s.name.startswith(word)), None)

    def candidates(self, before: str, text: str) -> list[str]:
        """Completions of ``text``, the word being typed after ``before`` (the line up to it)."""
        words = before.split()
        if not words:
            return [s.name + " " for s in self.syntaxes if s.name.startswith(text.lower())]
        syntax = self._syntax(words[0])
        position = len(words) - 1
        if syntax is None or position >= len(syntax.args):
            return []
        kind = syntax.args[position]
        try:
            if kind == "group":
                options = [str(g) for g in range(max(0, self.groups()))]
            elif kind == "channel":
                group = self.current_group()
                if position > 0 and syntax.args[position - 1] == "group":
                    try:
                        group = int(words[position])
                    except ValueError:
                        return []
                options = [str(c) for c in range(max(0, self.channels(group)))]
            elif kind.startswith("words:"):
                options = kind[len("words:"):].split("|")
            else:
                return []
        except (OSError, ValueError, IndexError):
            return []   # the state file went away or changed under us: no candidates
        last = position == len(syntax.args) - 1
        return [o + ("" if last else " ") for o in options if o.startswith(text)]

    def complete(self, text: str, state: int) -> str | None:
        """readline's completer: the ``state``-th candidate, None when there are no more."""
        if state == 0:
            import readline
            line = readline.get_line_buffer()
            self._matches = self.candidates(line[:readline.get_begidx()], text)
        return self._matches[state] if state < len(self._matches) else None


def syntaxes_from(commands: Sequence) -> list[Syntax]:
    """Specs from the shell's command table (objects with ``name`` and ``synopsis``)."""
    return [Syntax(c.name, arg_kinds(c.synopsis)) for c in commands]


def install_completion(shell, commands) -> None:
    """Bind Tab to completion for an interactive ``shell`` session over the
    shell's command table ``commands`` (readline only).  The table is passed
    in, so this module imports nothing of the shell's."""
    try:
        import readline
    except ImportError:
        return

    state = shell.state

    def groups() -> int:
        return state.ngroups

    def channels(group: int) -> int:
        return state.nchannels(group) if 0 <= group < state.ngroups else 0

    completer = Completer(syntaxes_from(commands), groups, channels, lambda: shell.group)
    readline.set_completer(completer.complete)
    readline.set_completer_delims(" \t")
    if "libedit" in (readline.__doc__ or ""):
        readline.parse_and_bind("bind ^I rl_complete")
    else:
        readline.parse_and_bind("tab: complete")
