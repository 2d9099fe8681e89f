"""The one help layout of every `gradserve` subcommand: descriptions kept as written (they document
each command's machine-readable output) and every option's default shown."""

from __future__ import annotations

import argparse
import copy

__all__ = ["HelpFormatter"]


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" to an option's help unless there is nothing to add: the help already
    says its default, the default is None (the help says what happens without the option), or the
    option is an on/off switch. An option without help still gets its default shown."""

    def _format_action(self, action: argparse.Action) -> str:
        if action.help is None and _shows_default(action):
            action = copy.copy(action)
            action.help = "default: %(default)s"
        return super()._format_action(action)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or not _shows_default(action):
            return text
        return f"{text} (default: %(default)s)"


def _shows_default(action: argparse.Action) -> bool:
    if action.default is None or action.default is argparse.SUPPRESS or not action.option_strings:
        return False
    return not (action.nargs == 0 and isinstance(action.default, bool))  # a switch: "not given"
