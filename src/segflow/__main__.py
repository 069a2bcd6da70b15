from segflow.cli import main

raise SystemExit(main())
