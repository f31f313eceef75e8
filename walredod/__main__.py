from walredod.tools.cli import main

raise SystemExit(main())
