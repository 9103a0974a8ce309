"""``python -m vvault_pep.cli``: the command line, kept at the path scripts already use.

The ``vvault-pep`` script, the benchmarks that run older revisions, the demo and the deploy
checks all start the PEP as ``-m vvault_pep.cli``; the commands themselves live in
:mod:`vvault_pep.app.cli`.
"""

from .app.cli import main

__all__ = ["main"]

if __name__ == "__main__":
    import sys

    sys.exit(main())
