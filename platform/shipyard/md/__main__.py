import sys

from shipyard.md.run import main

sys.exit(main())
