import sys

from pipeline.commands import main

sys.exit(main())
