"""Command lines: one error type for the user's mistakes, parsers that report them in one
line, and the wrapper every entry point runs under.

A user error -- a missing or malformed file or folder, a bad flag value, a corrupt
checkpoint, no GPU where one was asked for -- is raised as `UserError` with a message that
names the file or flag and says what to do. `entry_point(main)` turns it into one line on
stderr and exit status 2, with no traceback; `--debug` (or TAAN_DEBUG=1) shows the
traceback instead. Any other exception is a programming error and keeps its traceback.
"""
import argparse
import math
import os
import sys

BOOL_WORDS = {'true': True, '1': True, 'yes': True, 'y': True, 'on': True,
              'false': False, '0': False, 'no': False, 'n': False, 'off': False}


class UserError(ValueError):
    """Bad input from the user. The message names the file or flag and says what to do."""


def debug_requested(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    return '--debug' in argv or os.environ.get('TAAN_DEBUG', '').strip().lower() in ('1', 'true', 'yes')


def entry_point(main):
    """The console command of `main(argv=None)`: exit 0 on success, 2 on a UserError
    (one line on stderr), 130 when interrupted."""
    def command():
        if debug_requested():
            main()
            return
        try:
            main()
        except UserError as e:
            print(f'error: {e}', file=sys.stderr)
            sys.exit(2)
        except OSError as e:        # the file system said no: permission, disk full, ...
            if e.filename is None:
                raise
            print(f'error: {e.strerror or e}: {e.filename}', file=sys.stderr)
            sys.exit(2)
        except KeyboardInterrupt:
            print('interrupted', file=sys.stderr)
            sys.exit(130)
    command.__doc__ = main.__doc__
    return command


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the project's conventions: a bad flag is one line on stderr (exit 2,
    no usage dump), and every command takes --debug."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.add_argument('--debug', action='store_true', help='show the full traceback of an error')

    def error(self, message):
        print(f'error: {self.prog}: {message} (see {self.prog} --help)', file=sys.stderr)
        sys.exit(2)


def one_of(names):
    """argparse `type` that takes any of `names` in any case and returns its canonical
    spelling (use with choices=names, so that --help lists them)."""
    canonical = {str(n).lower(): n for n in names}

    def convert(text):
        try:
            return canonical[str(text).lower()]
        except KeyError:
            raise argparse.ArgumentTypeError(f"invalid choice: {text!r} (choose from {', '.join(map(str, names))}; "
                                             'any case)') from None
    return convert


def count(low=1):
    """argparse `type`: an integer >= low (a one-line error naming the flag otherwise)."""
    def convert(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f'expected an integer, got {text!r}') from None
        if value < low:
            raise argparse.ArgumentTypeError(f'must be >= {low}, got {value}')
        return value
    convert.__name__ = 'int'
    return convert


def real(low=None, above=None, high=None, below=None):
    """argparse `type`: a finite float with low <= x, above < x, x <= high, x < below (the bounds
    given); NaN, infinities and values out of range are a one-line error naming the flag."""
    def convert(text):
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f'expected a number, got {text!r}') from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f'must be a finite number, got {text!r}')
        for bound, ok, word in ((low, lambda b: value >= b, '>='), (above, lambda b: value > b, '>'),
                                (high, lambda b: value <= b, '<='), (below, lambda b: value < b, '<')):
            if bound is not None and not ok(bound):
                raise argparse.ArgumentTypeError(f'must be {word} {bound:g}, got {value:g}')
        return value
    convert.__name__ = 'float'
    return convert


def str2bool(text):
    """'true/false/1/0/yes/no/on/off' (any case) -> bool; anything else is an argparse error."""
    if isinstance(text, bool):
        return text
    value = BOOL_WORDS.get(str(text).strip().lower())
    if value is None:
        raise argparse.ArgumentTypeError(f'expected a boolean (true/false/1/0/yes/no), got {text!r}')
    return value


def add_bool_argument(parser, name, default=False, help=''):
    """`--name` alone means True; `--name true|false|1|0|yes|no` sets the value."""
    shown = 'auto' if default is None else default
    parser.add_argument(name, nargs='?', const=True, default=default, type=str2bool,
                        metavar='BOOL', help=f'{help} (true/false; a bare flag means true; default {shown})')


def split_glued_booleans(argv, option_names):
    """Split tokens like 'False--mrn_constant' into 'False', '--mrn_constant'.

    A shell line ending in 'False\\' followed by a line starting with '--flag' (as in some
    published command lines) reaches the program as one glued token. A token is split only
    when its head is a boolean word and its tail is a known option, so nothing else changes.
    """
    out = []
    for token in argv:
        head, sep, tail = token.partition('--')
        if sep and head and head.lower() in BOOL_WORDS and ('--' + tail.split('=')[0]) in option_names:
            out += [head, '--' + tail]
        else:
            out.append(token)
    return out
