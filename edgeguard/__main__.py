import sys

from edgeguard.cli import main

sys.exit(main())
