import sys

from qlora_kit.plan.estimate import main

sys.exit(main())
