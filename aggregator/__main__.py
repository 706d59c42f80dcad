from aggregator.cli import main; import sys; sys.exit(main())
