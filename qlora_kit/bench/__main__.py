import sys

from qlora_kit.bench import main

sys.exit(main())
