"""`python -m qlora_kit RECIPE` is the same as `python -m qlora_kit.run RECIPE`."""

import sys

from qlora_kit.run import main

sys.exit(main())
