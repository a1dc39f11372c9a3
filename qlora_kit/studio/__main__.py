"""`python -m qlora_kit.studio` is `qlora-kit studio`."""

import sys

from qlora_kit.studio.cli import main

sys.exit(main())
