"""`python -m builder ...` is the `tunefile` command."""
import sys

from builder.cli import main

sys.exit(main())
