"""One convention for bad input: ``InputError`` and the scripts' entry point.

Code under ``util/`` raises ``InputError`` (or a subclass) with a message that names the file and,
where there is one, the row: ``<file> row <n>: <what is wrong>``. It never exits. Scripts call
``run_main(main, args)``, which prints ``error: <message>`` on one line and exits with status 2,
without a traceback.
"""
import sys


class InputError(Exception):
    """Bad input (a file, a CSV row, a flag): the message says what, and which file and row."""


def message(e):
    """The message of an ``InputError``; one raised in a DataLoader worker arrives in the main process
    as the same type whose message is the worker's whole traceback: keep only the original message."""
    text = str(e)
    if text.startswith('Caught ') and 'Original Traceback' in text:
        marker = f'{type(e).__qualname__}: '
        i = text.rfind(marker)
        if i >= 0:
            return text[i + len(marker):].strip()
    return text


def run_main(main, args):
    """``main(args)``; an ``InputError`` becomes ``error: <message>`` on stderr and exit status 2."""
    try:
        return main(args)
    except InputError as e:
        print(f'error: {message(e)}', file=sys.stderr, flush=True)
        sys.exit(2)
