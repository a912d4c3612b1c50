"""``python -m flocora_codec``: the flocora-codec command line."""

import sys

from flocora_codec.cli import main

sys.exit(main())
