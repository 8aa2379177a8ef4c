import sys

from tnopt.cli import main

sys.exit(main())
