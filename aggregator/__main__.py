import sys

from aggregator.cli.daemon import main

sys.exit(main())
