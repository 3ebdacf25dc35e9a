import sys

from raydistill.cli import main

sys.exit(main())
