import sys

from maslat.cli import main

sys.exit(main())
