import sys

from qlora_kit.chat.cli import main

sys.exit(main())
