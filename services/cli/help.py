"""The one help layout of every `gradserve` subcommand: descriptions kept as written (they document
each command's machine-readable output) and every option's default shown."""

from __future__ import annotations

import argparse

__all__ = ["HelpFormatter"]


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" to an option's help unless it has no value to show: None (the help
    then says what happens when the option is absent) or a plain on/off switch that is off."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default is None or action.default is argparse.SUPPRESS or "%(default)" in text:
            return text
        if not action.option_strings or (action.nargs == 0 and isinstance(action.default, bool)):
            return text  # a positional, or a switch: its default is "not given"
        return f"{text} (default: %(default)s)"
