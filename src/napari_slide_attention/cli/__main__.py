"""``python -m napari_slide_attention.cli``: the ``slide-attention`` command."""

import sys

from . import main

sys.exit(main())
