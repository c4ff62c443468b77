"""Command lines: one error type for the user's mistakes, parsers that report them in one
line, and the wrapper every entry point runs under.

A user error -- a missing or malformed file or folder, a bad flag value, a corrupt
checkpoint, no GPU where one was asked for -- is raised as `UserError` with a message that
names the file or flag and says what to do. `entry_point(main)` turns it into one line on
stderr and exit status 2, with no traceback; `--debug` (or TAAN_DEBUG=1) shows the
traceback instead. Any other exception is a programming error and keeps its traceback.
"""
import argparse
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
