import sys

from kdtune.cli import main

sys.exit(main())
