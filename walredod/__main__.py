from walredod.cli import main

raise SystemExit(main())
