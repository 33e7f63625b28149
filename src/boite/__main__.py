import sys

from boite.cli import main

sys.exit(main())
