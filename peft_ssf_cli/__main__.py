"""``python -m peft_ssf_cli``: the ``peft-ssf`` command."""

import sys

from . import main

sys.exit(main())
