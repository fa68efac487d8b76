from tinyfed.cli import main

raise SystemExit(main())
