import sys

from qlora_kit.eval.cli import main

sys.exit(main())
